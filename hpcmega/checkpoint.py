"""Sharded checkpoints with torch.distributed.checkpoint (DCP) through fsspec: local paths, file://, memory://,
s3:// (s3fs).

Layout on storage: ``<url>/step-00000005/`` holds DCP's shard files and ``.metadata``; ``meta.json`` (step, layout,
W&B run id, time; readable without torch) is written by rank 0 *after* every rank's shards are written and a
barrier. ``meta.json`` is the commit marker: a folder without it (a job killed mid-save) is listed as incomplete and
never loaded. A marker written last works on object stores too, where a "rename" is a copy and not atomic.

Model and optimizer state go through ``get_state_dict``/``set_state_dict`` with the optimizer state flattened (a
nested one breaks reloading with pipeline parallelism) and full-model parameter names, so a checkpoint written with
one layout loads into another (DCP reshards on load).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "meta.json"


@dataclass
class CheckpointInfo:
    step: int
    url: str
    complete: bool
    size_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        lay = self.meta.get("layout") or {}
        return f"pp={lay.get('pp', '?')} dp={lay.get('dp', '?')} tp={lay.get('tp', '?')}" if lay else "?"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layout": self.layout}


def _fs(url: str, storage_options: dict | None = None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def list_checkpoints(url: str, storage_options: dict | None = None) -> list[CheckpointInfo]:
    """Every step folder under ``url``, oldest first; pure fsspec (no torch) so `hpcmega ckpt ls` is fast."""
    fs, root = _fs(url, storage_options)
    if not fs.exists(root):
        return []
    out = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = STEP_DIR.match(name)
        if not m:
            continue
        marker = entry.rstrip("/") + "/" + MARKER
        complete = fs.exists(marker)
        meta = json.loads(fs.cat_file(marker)) if complete else {}
        try:
            size = int(fs.du(entry))
        except Exception:  # some filesystems cannot size a folder; the listing still works
            size = 0
        out.append(CheckpointInfo(int(m.group(1)), _join(url, name), complete, size, meta))
    return sorted(out, key=lambda c: c.step)


class ModelOptimizerState:
    """DCP Stateful over all model parts on this rank (one per pipeline stage) and their optimizers."""

    def __init__(self, model_parts, optimizers) -> None:
        self.parts, self.optimizers = list(model_parts), list(optimizers)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        merged: dict[str, Any] = {}
        for part, opt in zip(self.parts, self.optimizers):
            model_sd, optim_sd = get_state_dict(part, opt, options=self._options())
            merged.update({f"model.{k}": v for k, v in model_sd.items()})
            merged.update({f"optim.{k}": v for k, v in optim_sd.items()})
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        for part, opt in zip(self.parts, self.optimizers):
            model_keys, optim_keys = (set(sd) for sd in get_state_dict(part, opt, options=self._options()))
            set_state_dict(
                part,
                opt,
                model_state_dict={k: state[f"model.{k}"] for k in model_keys},
                optim_state_dict={k: state[f"optim.{k}"] for k in optim_keys},
                options=self._options(),
            )


class TrainState:
    """Step and data position. The data and the LR are functions of the step (global sample index), and the model
    has no dropout, so these two numbers plus model/optimizer are everything a bit-exact resume needs."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.trainer.step, "loader": self.trainer.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.step = int(state["step"])
        self.trainer.loader.load_state_dict(state["loader"])


class CheckpointManager:
    """Collective save/load of step checkpoints under one URL, keeping the newest ``keep`` complete ones."""

    def __init__(self, url: str, keep: int = 3, storage_options: dict | None = None) -> None:
        self.url, self.keep, self.storage_options = url.rstrip("/"), keep, storage_options or {}

    def list(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.url, self.storage_options)

    def latest(self) -> CheckpointInfo | None:
        complete = [c for c in self.list() if c.complete]
        return complete[-1] if complete else None

    def save(self, step: int, app_state: dict[str, Any], meta: dict[str, Any]) -> CheckpointInfo:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        url = _join(self.url, f"step-{step:08d}")
        rank = dist.get_rank()
        if rank == 0:  # a folder left by a save that was killed at this step: start clean
            fs, path = _fs(url, self.storage_options)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.makedirs(path, exist_ok=True)
        dist.barrier()
        dcp.save(app_state, storage_writer=FsspecWriter(url, **self.storage_options))
        dist.barrier()  # every rank's shards are on storage before the marker
        if rank == 0:
            fs, path = _fs(url, self.storage_options)
            fs.pipe_file(path + "/" + MARKER, json.dumps({"step": step, "time": time.time(), **meta}).encode())
            self._prune()
        dist.barrier()
        return CheckpointInfo(step, url, True, meta=meta)

    def load(self, url: str, app_state: dict[str, Any]) -> dict[str, Any]:
        """Load the checkpoint at ``url`` (a step folder) into ``app_state``; returns its meta. Refuses incomplete."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        fs, path = _fs(url, self.storage_options)
        marker = path.rstrip("/") + "/" + MARKER
        if not fs.exists(marker):
            raise FileNotFoundError(
                f"{url} is not a complete checkpoint (no {MARKER}); pick one listed complete by `hpcmega ckpt ls`"
            )
        dcp.load(app_state, storage_reader=FsspecReader(url, **self.storage_options))
        return json.loads(fs.cat_file(marker))

    def _prune(self) -> None:
        """Rank 0: drop complete checkpoints beyond the newest ``keep`` and incomplete ones older than the newest."""
        infos = self.list()
        complete = [c for c in infos if c.complete]
        doomed = complete[: max(0, len(complete) - self.keep)]
        if complete:
            doomed += [c for c in infos if not c.complete and c.step < complete[-1].step]
        for c in doomed:
            fs, path = _fs(c.url, self.storage_options)
            fs.rm(path, recursive=True)

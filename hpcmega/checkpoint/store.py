"""Sharded checkpoints with torch.distributed.checkpoint (DCP) through fsspec: local paths, file://, memory://,
s3:// (s3fs).

Layout on storage: ``<url>/step-00000005/`` holds DCP's shard files and ``.metadata``; ``meta.json`` is the commit
marker, written by rank 0 *after* every rank's shards are on storage. It holds the step, layout, W&B run id, model
config and a **manifest** (size and SHA-256 of every file), so a checkpoint is complete iff ``meta.json`` exists,
and intact iff its files match the manifest. The marker itself is written atomically: on local/shared disks as a
temporary file renamed over the name (``rename(2)``); on object stores one PUT of the whole object (S3 never shows
a half-written object), so no reader ever sees a half-written marker. Each rank hashes the shard files it wrote, so
the checksums cost one parallel read of the checkpoint.

Timeline. Every checkpoint records its ``lineage`` (one per uninterrupted history), its ``parent`` (the checkpoint
this history continued from), the SLURM ``attempt`` that wrote it and a ``seq`` number that grows with every save in
the location. "Latest" means the newest *save*, not the highest step: resuming an older step starts a new lineage,
its saves are newer than the abandoned timeline's higher steps, and ``--resume auto`` continues the new one.
Pruning keeps the newest ``keep`` of the current lineage only, never the checkpoint resumed from, and a save never
deletes a complete folder at its step: it writes next to it (``step-00000005-<id>``).

Model and optimizer state go through ``get_state_dict``/``set_state_dict`` with the optimizer state flattened (a
nested one breaks reloading with pipeline parallelism) and full-model parameter names, so a checkpoint written with
one layout loads into another (DCP reshards on load).

Trust: DCP's ``.metadata`` is a pickle, so loading a checkpoint runs whatever code a crafted one contains; the
run refuses checkpoints from outside its own checkpoint location unless told to trust them (hpcmega.checkpoint.rules).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

STEP_DIR = re.compile(r"^step-(\d{8})(?:-([0-9a-f]{6}))?$")
MARKER = "meta.json"
_CHUNK = 8 << 20


class CheckpointDamaged(RuntimeError):
    """A complete checkpoint whose files do not match its manifest (deleted, truncated or altered)."""


@dataclass
class CheckpointInfo:
    step: int
    url: str
    complete: bool
    size_bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    damage: str = ""  # why the files do not match the manifest ("" = they do, as far as sizes show)

    @property
    def layout(self) -> str:
        lay = self.meta.get("layout")
        if not isinstance(lay, dict) or not lay:
            return "?"
        return f"pp={lay.get('pp', '?')} dp={lay.get('dp', '?')} tp={lay.get('tp', '?')}"

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def lineage(self) -> str:
        return str(self.meta.get("lineage", ""))

    @property
    def usable(self) -> bool:
        return self.complete and not self.damage

    @property
    def state(self) -> str:
        return "DAMAGED" if self.complete and self.damage else "complete" if self.complete else "INCOMPLETE"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layout": self.layout, "state": self.state}


def _fs(url: str, storage_options: dict | None = None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _put_atomic(fs, path: str, data: bytes) -> None:
    """Readers see the old state or the whole new file, never part of it (see the module docstring)."""
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: an object store publishes it whole or not at all


def _read_meta(fs, marker: str) -> tuple[dict[str, Any], str]:
    """(meta, damage): an unreadable marker is a damaged checkpoint, never an exception."""
    try:
        meta = json.loads(fs.cat_file(marker))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, f"{MARKER} is unreadable ({type(e).__name__})"
    if isinstance(meta, dict) and "manifest" not in meta:  # only a finished save writes one: nothing to verify
        return {}, f"{MARKER} has no manifest (not written by a finished save)"
    manifest = meta.get("manifest") if isinstance(meta, dict) else None
    if not isinstance(manifest, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in manifest.values()):
        return {}, f"{MARKER} is not a checkpoint record"
    return meta, ""


def _sizes(fs, folder: str) -> dict[str, int]:
    out = {}
    for entry in fs.find(folder, detail=True).values():
        rel = entry["name"][len(folder.rstrip("/")) + 1:]
        out[rel] = int(entry.get("size") or 0)
    return out


def sha256_of(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_problems(fs, folder: str, manifest: dict[str, Any], checksums: bool,
                      names: list[str] | None = None) -> list[str]:
    """What is wrong with ``folder``'s files against its manifest: sizes always, SHA-256 if ``checksums``."""
    sizes = _sizes(fs, folder)
    problems = []
    for name in (names if names is not None else sorted(manifest)):
        want_size, want_sha = manifest[name]
        if name not in sizes:
            problems.append(f"{name} is missing")
        elif sizes[name] != want_size:
            problems.append(f"{name} is {sizes[name]} bytes, the manifest says {want_size}")
        elif checksums and sha256_of(fs, _join(folder, name)) != want_sha:
            problems.append(f"{name} does not match its SHA-256 (altered on storage)")
    return problems


def list_checkpoints(url: str, storage_options: dict | None = None) -> list[CheckpointInfo]:
    """Every step folder under ``url``, oldest save first; pure fsspec (no torch) so `hpcmega ckpt ls` is fast.
    Sizes are checked against each manifest (cheap); checksums only by :func:`verify_checkpoint`."""
    fs, root = _fs(url, storage_options)
    if not fs.exists(root):
        return []
    out = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = STEP_DIR.match(name)
        if not m:
            continue
        folder = entry.rstrip("/")
        marker = folder + "/" + MARKER
        complete = fs.exists(marker)
        meta, damage = _read_meta(fs, marker) if complete else ({}, "")
        if complete and not damage:
            damage = "; ".join(manifest_problems(fs, folder, meta.get("manifest", {}), checksums=False))
        try:
            size = int(fs.du(folder))
        except Exception:  # some filesystems cannot size a folder; the listing still works
            size = 0
        out.append(CheckpointInfo(int(m.group(1)), _join(url, name), complete, size, meta, damage))
    return sorted(out, key=lambda c: (c.step, c.name))


def by_save_order(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest save first (``seq``). One whose marker is unreadable counts as the newest: a
    torn marker is what the last save leaves, and it must be reported before older ones are used."""
    def key(c: CheckpointInfo) -> tuple[float, int]:
        seq = c.meta.get("seq")
        return (float("inf") if not c.meta else float(seq if isinstance(seq, int) else 0), c.step)

    return sorted((c for c in infos if c.complete), key=key)


def latest_checkpoint(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    """THE latest checkpoint of a location: the newest *save* that is complete and intact (sizes match its
    manifest), or None. Every reader asks this one rule -- `resume`, `status`, `ckpt ls`, `sample`, `ckpt export`,
    the pre-flight check and the ranks' ``--resume auto`` (which also verifies checksums and falls back past a
    damaged one) -- so after resuming an older step they all name the new lineage's newest save, not the abandoned
    timeline's higher step."""
    usable = [c for c in by_save_order(infos) if c.usable]
    return usable[-1] if usable else None


def verify_checkpoint(url: str, checksums: bool = True, storage_options: dict | None = None) -> list[str]:
    """Everything wrong with one checkpoint folder (empty list = intact); no torch."""
    fs, path = _fs(url, storage_options)
    marker = path.rstrip("/") + "/" + MARKER
    if not fs.exists(marker):
        return [f"no {MARKER}: not a complete checkpoint (a save that did not finish)"]
    meta, damage = _read_meta(fs, marker)
    if damage:
        return [damage]
    return manifest_problems(fs, path.rstrip("/"), meta["manifest"], checksums)


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


    def weights(self) -> "ModelWeights":
        return ModelWeights(self.parts)


class ModelWeights:
    """DCP Stateful over the model parts only, under the names ModelOptimizerState gives them: what a weights-only
    load reads (``--init-from``, or a checkpoint written by `ckpt import`, which has no optimizer state)."""

    def __init__(self, model_parts) -> None:
        self.parts = list(model_parts)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {f"model.{k}": v for part in self.parts for k, v in get_model_state_dict(part).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        for part in self.parts:
            set_model_state_dict(part, {k: state[f"model.{k}"] for k in get_model_state_dict(part)})


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


def _dist():
    import torch.distributed as dist

    return dist


def _everyone(value: Any, group=None) -> list[Any]:
    """all_gather_object: every rank's ``value``, in rank order (small Python objects only)."""
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out


def _from_rank0(value: Any, group=None) -> Any:
    box = [value]
    _dist().broadcast_object_list(box, src=0, group=group)
    return box[0]


def checkpoint_group(timeout_s: int):
    """A gloo group of all ranks with its own, longer timeout for checkpoint collectives (collective: every rank
    calls it at the same point). A save to slow shared storage can take longer than the training collectives are
    allowed to wait; on its own CPU group it neither trips the NCCL watchdog nor waits on the GPU stream."""
    import datetime

    return _dist().new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class CheckpointManager:
    """Collective save/load of step checkpoints under one URL; see the module docstring for the timeline rules.

    ``begin(resumed)`` fixes this attempt's lineage once (before the first save); ``save``, ``load`` and
    ``resume_auto`` are collective (every rank calls them); ``list``/``latest`` work anywhere.
    """

    def __init__(self, url: str, keep: int = 3, storage_options: dict | None = None, checksums: bool = True,
                 process_group=None) -> None:
        self.url, self.keep, self.storage_options = url.rstrip("/"), keep, storage_options or {}
        self.group = process_group  # every collective of save/load/resume; None = the default group
        self.checksums, self.attempt = checksums, 0
        self.lineage, self.parent, self.resumed_from = uuid.uuid4().hex[:8], None, None

    def list(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.url, self.storage_options)

    def latest(self) -> CheckpointInfo | None:
        """The latest checkpoint here (:func:`latest_checkpoint`)."""
        return latest_checkpoint(self.list())

    # -- timeline --------------------------------------------------------------------------------------------------
    def begin(self, resumed: CheckpointInfo | None, attempt: int = 0) -> str | None:
        """Choose this attempt's lineage (collective: rank 0 decides). Continuing the newest save of this location
        keeps its lineage; resuming anything older starts a new lineage, whose saves never prune the old one's.
        Returns a message for the user when a new lineage starts from an older checkpoint."""
        self.attempt = attempt
        message = None
        if _dist().get_rank() == 0:
            if resumed is not None:
                self.parent = self.resumed_from = resumed.url
                newest = self.latest()
                inside = resumed.url.rstrip("/").rsplit("/", 1)[0] == self.url
                if inside and newest is not None and newest.name == resumed.name and resumed.lineage:
                    self.lineage = resumed.lineage
                elif inside and newest is not None and newest.name != resumed.name:
                    message = (f"resuming {resumed.name}, which is older than the newest checkpoint {newest.name}: "
                               f"starting a new lineage {self.lineage}; the newer checkpoints are kept, not pruned")
        self.lineage, self.parent, self.resumed_from, message = _from_rank0(
            (self.lineage, self.parent, self.resumed_from, message), self.group)
        return message

    # -- save ------------------------------------------------------------------------------------------------------
    def _folder_for(self, step: int) -> str:
        """Rank 0: ``step-N``, or ``step-N-<id>`` when a complete checkpoint already holds that name (another
        lineage's): a save never deletes a complete folder. A folder a killed save left at the name is cleared."""
        name = f"step-{step:08d}"
        fs, path = _fs(_join(self.url, name), self.storage_options)
        if fs.exists(path):
            if fs.exists(path.rstrip("/") + "/" + MARKER):
                name = f"{name}-{uuid.uuid4().hex[:6]}"
            else:
                fs.rm(path, recursive=True)
        fs.makedirs(_fs(_join(self.url, name), self.storage_options)[1], exist_ok=True)
        return _join(self.url, name)

    def _hash_own_files(self, url: str) -> dict[str, list]:
        """The files this rank wrote (DCP names them ``__<rank>_*``; rank 0 also writes ``.metadata``)."""
        fs, path = _fs(url, self.storage_options)
        rank = _dist().get_rank()
        mine = {}
        for name, size in _sizes(fs, path).items():
            if name.startswith(f"__{rank}_") or (rank == 0 and not name.startswith("__")):
                mine[name] = [size, sha256_of(fs, _join(path, name))]
        return mine

    def save(self, step: int, app_state: dict[str, Any], meta: dict[str, Any], planner=None,
             file_per_tensor: bool = False) -> CheckpointInfo:
        """Collective. ``planner``: a DCP SavePlanner (default: DCP's); ``file_per_tensor``: one file per tensor
        instead of one per rank (DCP's writer holds every tensor of the file it writes until the file is done;
        the Hugging Face import streams, hpcmega.models.hf)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dist = _dist()
        rank = dist.get_rank()
        url = _from_rank0(self._folder_for(step) if rank == 0 else None, self.group)
        # One writer thread: files are written one after another, which the import's release of each written
        # tensor relies on (hpcmega.models.hf.Made).
        writer = FsspecWriter(url, single_file_per_rank=not file_per_tensor, thread_count=1, **self.storage_options)
        dcp.save(app_state, storage_writer=writer, planner=planner, process_group=self.group)
        manifest: dict[str, list] = {}
        for part in _everyone(self._hash_own_files(url), self.group):  # after every rank's shards are on storage
            manifest.update(part)
        record = {**meta, "step": step, "time": time.time(), "lineage": self.lineage, "parent": self.parent,
                  "attempt": self.attempt, "manifest": manifest}
        if rank == 0:
            seq = 1 + max([c.meta["seq"] for c in self.list() if isinstance(c.meta.get("seq"), int)] or [0])
            fs, path = _fs(url, self.storage_options)
            _put_atomic(fs, path.rstrip("/") + "/" + MARKER, json.dumps({**record, "seq": seq}).encode())
            self._prune()
        dist.barrier(group=self.group)
        self.parent = url
        return CheckpointInfo(step, url, True, meta=record)

    # -- load ------------------------------------------------------------------------------------------------------
    def problems(self, info: CheckpointInfo) -> list[str]:
        """Collective: each rank checks a share of the files (size, and SHA-256 unless disabled)."""
        dist = _dist()
        if info.damage:  # the listing found it already (a marker without a manifest included)
            return [info.damage]
        names = sorted(info.meta["manifest"])[dist.get_rank()::dist.get_world_size()]
        fs, path = _fs(info.url, self.storage_options)
        mine = manifest_problems(fs, path.rstrip("/"), info.meta["manifest"], self.checksums, names)
        return [p for part in _everyone(mine, self.group) for p in part]

    def info(self, url: str) -> CheckpointInfo:
        """The listing entry of one checkpoint folder (any location)."""
        parent, name = url.rstrip("/").rsplit("/", 1)
        for c in list_checkpoints(parent, self.storage_options):
            if c.name == name:
                return c
        raise FileNotFoundError(f"{url} is not a checkpoint folder (step-NNNNNNNN); pick one from `hpcmega ckpt ls`")

    def load(self, url: str, app_state: dict[str, Any],
             check: Callable[[CheckpointInfo], None] = lambda info: None, weights_only: bool = False) -> dict[str, Any]:
        """Verify, ``check`` (e.g. the model config; raises to refuse), then load the checkpoint at ``url`` into
        ``app_state``; returns its meta. Only the model weights (``app_state["model"].weights()``) are loaded when
        ``weights_only`` or when the checkpoint holds nothing else (its meta says ``weights_only``: an import)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        info = self.info(url)
        if not info.complete:
            raise FileNotFoundError(
                f"{url} is not a complete checkpoint (no {MARKER}); pick one listed complete by `hpcmega ckpt ls`")
        problems = self.problems(info)
        if problems:
            raise CheckpointDamaged(f"checkpoint {url} is damaged: {'; '.join(problems)}")
        check(info)
        if weights_only or info.meta.get("weights_only"):
            app_state = {"model": app_state["model"].weights()}
        dcp.load(app_state, storage_reader=FsspecReader(url, **self.storage_options), process_group=self.group)
        return info.meta

    def resume_auto(self, app_state: dict[str, Any], say: Callable[[str], None],
                    check: Callable[[CheckpointInfo], None] = lambda info: None) -> CheckpointInfo | None:
        """Load the latest checkpoint (:func:`latest_checkpoint`: newest save first), verifying checksums too and
        reporting and skipping damaged ones (collective)."""
        for info in reversed(by_save_order(self.list())):
            problems = self.problems(info)
            if problems:
                say(f"checkpoint {info.url} is DAMAGED ({'; '.join(problems)}); falling back to the previous one")
                continue
            self.load(info.url, app_state, check)
            return info
        return None

    def _prune(self) -> None:
        """Rank 0: keep the newest ``keep`` complete saves of this lineage (never the one resumed from); drop
        incomplete folders below the newest step of this lineage. Other lineages are never touched."""
        infos = self.list()
        mine = [c for c in by_save_order(infos) if c.lineage == self.lineage]
        protected = {self.resumed_from.rstrip("/").rsplit("/", 1)[-1]} if self.resumed_from else set()
        doomed = [c for c in mine[: max(0, len(mine) - self.keep)] if c.name not in protected]
        if mine:
            doomed += [c for c in infos if not c.complete and c.step < mine[-1].step]
        for c in doomed:
            fs, path = _fs(c.url, self.storage_options)
            fs.rm(path, recursive=True)

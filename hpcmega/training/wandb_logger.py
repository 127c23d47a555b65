"""Weights & Biases logging from global rank 0, one W&B run per hpcmega run folder.

The run id is created once, with the run folder (``<run_dir>/wandb_run_id``), and reused by every later attempt:
a requeued or resumed job continues the *same* W&B run with increasing steps -- rewound first when it resumes from
a checkpoint older than the last logged step (see WandbLogger). The run config carries the SLURM job id, nodes,
layout, attempt/restart count and git commit. Offline mode
(the default: compute nodes often have no internet) writes under the run folder; `hpcmega sync RUN_DIR` uploads
later. The API key is read by wandb from the environment at run time; nothing here writes it anywhere.

W&B is a copy, never a reason to stop: metrics.jsonl has every step. Any W&B failure (a bad key, no network once
wandb.init gives up, a full disk under wandb/) turns W&B off for the rest of the attempt with one warning.
"""
from __future__ import annotations

import os
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Any

from hpcmega.runs.files import METRICS, RunFolder
from hpcmega.runs.files import WANDB_ID as RUN_ID_FILE


def run_id_for(run_dir: str | os.PathLike) -> str:
    """This run folder's W&B run id, created on first use."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_ID_FILE}.tmp-{os.getpid()}")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def git_commit() -> str | None:
    """The commit of the hpcmega source that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class WandbLogger:
    """Starts the W&B run at the first logged step, when it knows where this attempt begins: a step W&B already
    has (the attempt resumed from a checkpoint older than the last logged step) rewinds the run to the step
    before it (``resume_from="<id>?_step=<k>"``: W&B keeps steps <= k and accepts k+1 onwards), so no step is
    rejected or counted twice; otherwise the run simply continues (``resume="allow"``)."""

    def __init__(self, cfg, run_dir: str, system: dict[str, Any] | None = None) -> None:
        self.run = None
        self.cfg, self.run_dir, self.system = cfg, run_dir, dict(system or {})
        self.mode = cfg.logging.wandb
        self.rewound_to: int | None = None
        if self.mode == "disabled":
            return
        self.run_id = run_id_for(run_dir)
        # every step record so far went to W&B too: its last step is the last one metrics.jsonl has
        self.logged_until = max((int(r["step"]) for r in RunFolder(run_dir).steps()), default=0)

    def _start(self, first_step: int) -> None:
        import torch
        import wandb

        cfg = self.cfg
        system = {"host": platform.node(), "torch": torch.__version__, "git_commit": git_commit(), **self.system}
        where: dict[str, Any] = {"id": self.run_id, "resume": "allow"}
        if first_step <= self.logged_until:
            self.rewound_to = first_step - 1
            where = {"resume_from": f"{self.run_id}?_step={self.rewound_to}"}
        self.run = wandb.init(
            project=cfg.logging.project,
            entity=cfg.logging.entity or None,
            group=cfg.logging.group or None,
            tags=list(cfg.logging.tags) or None,
            name=cfg.logging.run_name or Path(self.run_dir).name,
            dir=self.run_dir,
            mode=self.mode,
            config={**cfg.to_dict(), "system": system},
            **where,
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.mode == "disabled":
            return
        values = {k: v for k, v in record.items() if k != "step"}
        try:
            if self.run is None:
                self._start(int(record["step"]))
                values["attempt"] = self.system.get("attempt", 1)  # a marker on the chart where each attempt starts
            self.run.log(values, step=record["step"])
        except Exception as e:  # noqa: BLE001 - whatever wandb raises, training goes on
            self._give_up(e)

    def _give_up(self, error: Exception) -> None:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        print(f"warning: W&B {self.mode} logging failed and is off for this attempt ({type(error).__name__}: "
              f"{first}); every step is still in {Path(self.run_dir) / METRICS}", flush=True)
        self.mode, self.run = "disabled", None

    def describe(self) -> str | None:
        """One line for the job log: where this run's W&B data goes."""
        if self.mode == "disabled":
            return None
        if self.mode == "offline":
            return f"W&B offline run {self.run_id}: `hpcmega sync {self.run_dir}` uploads it"
        return f"W&B run {self.run_id} (project {self.cfg.logging.project})"

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                self._give_up(e)
            self.run = None

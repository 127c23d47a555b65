"""Weights & Biases logging from global rank 0, one W&B run per hpcmega run folder.

The run id is created once, with the run folder (``<run_dir>/wandb_run_id``), and reused by every later attempt:
a requeued or resumed job continues the *same* W&B run (``resume="allow"``) with increasing steps. Offline mode
(the default: compute nodes often have no internet) writes under the run folder; `hpcmega sync RUN_DIR` uploads
later. The API key is read by wandb from the environment at run time; nothing here writes it anywhere.
"""
from __future__ import annotations

import os
import platform
import secrets
from pathlib import Path
from typing import Any

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


class WandbLogger:
    def __init__(self, cfg, run_dir: str, system: dict[str, Any] | None = None) -> None:
        self.run = None
        self.mode = cfg.logging.wandb
        if self.mode == "disabled":
            return
        import torch
        import wandb

        self.run_id = run_id_for(run_dir)
        config = {**cfg.to_dict(), "system": {"host": platform.node(), "torch": torch.__version__, **(system or {})}}
        self.run = wandb.init(
            project=cfg.logging.project,
            entity=cfg.logging.entity or None,
            name=cfg.logging.run_name or Path(run_dir).name,
            id=self.run_id,
            resume="allow",
            dir=run_dir,
            mode=self.mode,
            config=config,
        )

    @property
    def url(self) -> str | None:
        return getattr(self.run, "url", None) if self.run is not None else None

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

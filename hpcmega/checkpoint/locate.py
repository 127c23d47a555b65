"""Which checkpoint a user means: a step folder, a checkpoint folder, or a run folder (pure fsspec, no torch)."""
from __future__ import annotations

import os

from hpcmega.checkpoint.store import MARKER, CheckpointInfo, by_save_order, latest_checkpoint, list_checkpoints
from hpcmega.errors import ConfigError
from hpcmega.checkpoint.rules import check_trusted
from hpcmega.runs.files import checkpoints_of, enclosing_run


def resume_target(value: str) -> str:
    """``checkpoint.resume`` as a location, the one rule the pre-flight and the ranks apply: ``auto`` and ``none``
    as they are, a URL as it is, a path made absolute."""
    if value in ("auto", "none") or "://" in value:
        return value
    return os.path.abspath(value)


def _is_step_folder(target: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(target)
    return fs.exists(path.rstrip("/") + "/" + MARKER)


def find_checkpoint(target: str, step: int | None = None, trust: bool = False) -> CheckpointInfo:
    """The latest checkpoint under ``target`` (:func:`latest_checkpoint`, what ``--resume auto`` takes), or the
    newest save of ``step``; a
    step folder is taken as is. Damaged checkpoints (files not matching their manifest's sizes) are never chosen.
    Outside the checkpoint location of the run folder ``target`` is (or is in), only with ``trust``: loading it
    unpickles its DCP metadata (the rule of ``--resume``)."""
    info = _choose(target.rstrip("/"), step)
    run = enclosing_run(target)
    check_trusted(info.url, run.checkpoint_url() if run else None, trust, named="checkpoint")
    return info


def _choose(target: str, step: int | None) -> CheckpointInfo:
    if _is_step_folder(target):
        parent, name = target.rsplit("/", 1)
        candidates = [i for i in list_checkpoints(parent) if i.name == name]
    else:
        candidates = by_save_order(list_checkpoints(checkpoints_of(target)))
    usable = [i for i in candidates if i.usable]
    chosen = latest_checkpoint([i for i in candidates if step is None or i.step == step])
    if chosen:
        return chosen
    damaged = "".join(f"; {i.name} is DAMAGED ({i.damage})" for i in candidates if i.damage)
    if not usable:
        raise ConfigError(f"no complete, intact checkpoint under {target}{damaged}; give a run folder, "
                          "RUN/checkpoints or a step folder listed complete by `hpcmega ckpt ls`")
    raise ConfigError(f"{target} has no complete checkpoint of step {step}{damaged}; complete step(s): "
                      f"{', '.join(str(i.step) for i in usable)}")

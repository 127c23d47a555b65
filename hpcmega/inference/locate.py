"""Which checkpoint a user means: a step folder, a checkpoint folder, or a run folder (pure fsspec, no torch)."""
from __future__ import annotations

from hpcmega.checkpoint import MARKER, CheckpointInfo, list_checkpoints
from hpcmega.config import ConfigError
from hpcmega.runs.files import checkpoints_of


def _is_step_folder(target: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(target)
    return fs.exists(path.rstrip("/") + "/" + MARKER)


def find_checkpoint(target: str, step: int | None = None) -> CheckpointInfo:
    """The newest complete checkpoint under ``target``, or the one of ``step``; a step folder is taken as is."""
    target = target.rstrip("/")
    if _is_step_folder(target):
        candidates = [i for i in list_checkpoints(target.rsplit("/", 1)[0]) if i.url == target]
    else:
        candidates = [i for i in list_checkpoints(checkpoints_of(target)) if i.complete]
    if not candidates:
        raise ConfigError(f"no complete checkpoint under {target}; give a run folder, RUN/checkpoints or a step "
                          "folder listed complete by `hpcmega ckpt ls`")
    if step is None:
        return candidates[-1]
    for info in candidates:
        if info.step == step:
            return info
    raise ConfigError(f"{target} has no complete checkpoint of step {step}; complete step(s): "
                      f"{', '.join(str(i.step) for i in candidates)}")

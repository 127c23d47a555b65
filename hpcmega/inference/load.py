"""Load a checkpoint of any layout into the single-process model (DCP reshards the shards on load)."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from hpcmega.checkpoint.store import CheckpointInfo, verify_checkpoint
from hpcmega.config import Config
from hpcmega.errors import ConfigError
from hpcmega.models.common import new_model


def checkpoint_config(info: CheckpointInfo) -> Config:
    if "config" not in info.meta:
        raise ConfigError(f"{info.url}/meta.json records no config (written by an older hpcmega); cannot rebuild "
                          "the model")
    return Config.from_dict(info.meta["config"])


def load_model(info: CheckpointInfo) -> tuple[nn.Module, Config]:
    """The full fp32 model of checkpoint ``info`` on the CPU, in eval mode, and the run's config.

    Every file is first checked against the checkpoint's manifest (sizes and SHA-256). Only model tensors are read
    (optimizer state and data position stay on storage)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    cfg = checkpoint_config(info)
    problems = verify_checkpoint(info.url) if "manifest" in info.meta else []  # older ones carry no manifest
    if problems:
        raise ConfigError(f"checkpoint {info.url} is damaged: {'; '.join(problems)}; pick another one from "
                          "`hpcmega ckpt ls`")
    with torch.device("meta"):
        model = new_model(cfg.model)
    model.to_empty(device="cpu")
    tensors = model.state_dict()  # the model's own storage: DCP loads into it in place
    # The checkpoint's app state is {"model": ModelOptimizerState, ...}, whose keys are "model.<param>" and
    # "optim.<...>"; asking for the "model." ones only leaves the optimizer state unread.
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": {f"model.{name}": t for name, t in tensors.items()}},
                 storage_reader=FsspecReader(info.url), no_dist=True)
    return model.eval(), cfg

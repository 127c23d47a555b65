"""The config flags shared by `plan`, `run`, `submit` and `config show`, mapped to dotted config keys.

Every flag defaults to None, meaning "not given", so the TOML file and presets keep their values.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from hpcmega.config import (
    MODEL_PRESETS,
    PRECISIONS,
    RANK_ORDERS,
    RECOMPUTE_MODES,
    SCHEDULES,
    WANDB_MODES,
    ConfigError,
    Config,
    load_config,
)

# (flag declarations, dotted key, click kwargs)
_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--model",), "model.preset", dict(type=click.Choice(list(MODEL_PRESETS)), help="Model preset.")),
    (("--vocab-size",), "model.vocab_size", dict(type=int)),
    (("--d-model",), "model.d_model", dict(type=int)),
    (("--layers",), "model.n_layers", dict(type=int)),
    (("--heads",), "model.n_heads", dict(type=int)),
    (("--tp",), "parallel.tp", dict(type=int, help="Tensor-parallel size (inside one node).")),
    (("--pp",), "parallel.pp", dict(type=int, help="Pipeline-parallel size.")),
    (("--dp",), "parallel.dp", dict(type=int, help="Data-parallel size (default: derived).")),
    (("--sequence-parallel/--no-sequence-parallel",), "parallel.sequence_parallel", dict(default=None)),
    (("--schedule",), "parallel.schedule", dict(type=click.Choice(SCHEDULES))),
    (("--virtual-stages",), "parallel.virtual_stages", dict(type=int)),
    (("--microbatches",), "parallel.microbatches", dict(type=int)),
    (("--order",), "parallel.order", dict(type=click.Choice(RANK_ORDERS))),
    (("--recompute",), "parallel.recompute", dict(type=click.Choice(RECOMPUTE_MODES))),
    (("--reshard-after-forward/--no-reshard-after-forward",), "parallel.reshard_after_forward", dict(default=None)),
    (("--compile/--no-compile",), "parallel.compile", dict(default=None, help="torch.compile each block.")),
    (("--steps",), "train.steps", dict(type=int)),
    (("--global-batch",), "train.global_batch", dict(type=int)),
    (("--micro-batch",), "train.micro_batch", dict(type=int)),
    (("--seq-len",), "train.seq_len", dict(type=int)),
    (("--lr",), "train.lr", dict(type=float)),
    (("--warmup-steps",), "train.warmup_steps", dict(type=int)),
    (("--seed",), "train.seed", dict(type=int)),
    (("--precision",), "train.precision", dict(type=click.Choice(PRECISIONS))),
    (("--data",), "train.data", dict(help="'synthetic' or the URL of prepared shards.")),
    (("--wandb",), "logging.wandb", dict(type=click.Choice(WANDB_MODES))),
    (("--wandb-project",), "logging.project", dict()),
    (("--run-name",), "logging.run_name", dict()),
    (("--save-every",), "checkpoint.save_every", dict(type=int)),
    (("--keep",), "checkpoint.keep", dict(type=int, help="Checkpoints to keep.")),
    (("--ckpt-url",), "checkpoint.url", dict(help="fsspec URL for checkpoints (default: RUN_DIR/checkpoints).")),
    (("--resume",), "checkpoint.resume", dict(help="auto | none | a checkpoint URL.")),
]

# Flags describing the machine; `run` replaces them with --nproc.
CLUSTER_FLAGS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--nodes",), "cluster.nodes", dict(type=int)),
    (("--gpus-per-node",), "cluster.gpus_per_node", dict(type=int, help="GPUs per node (with --cpu: tasks).")),
    (("--nvlink-domain-nodes",), "cluster.nvlink_domain_nodes", dict(type=int, help="Nodes per NVLink domain.")),
    (("--cpu/--gpu",), "cluster.cpu", dict(default=None, help="CPU-only nodes with gloo.")),
]


def _param_name(decls: tuple[str, ...]) -> str:
    return decls[0].split("/")[0].lstrip("-").replace("-", "_")


def add_options(flags: list[tuple[tuple[str, ...], str, dict[str, Any]]]) -> Callable:
    def decorate(fn: Callable) -> Callable:
        for decls, _key, kwargs in reversed(flags):
            fn = click.option(*decls, _param_name(decls), **{"default": None, **kwargs})(fn)
        return fn

    return decorate


def config_options(fn: Callable) -> Callable:
    """--config FILE plus every model/parallel/train/logging/checkpoint flag."""
    fn = add_options(_FLAGS)(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")(fn)


def collect_overrides(kwargs: dict[str, Any], include_cluster: bool = True) -> dict[str, Any]:
    """Pop the config flags out of a command's kwargs into {dotted key: value}."""
    flags = _FLAGS + (CLUSTER_FLAGS if include_cluster else [])
    out: dict[str, Any] = {}
    for decls, key, _ in flags:
        name = _param_name(decls)
        if name in kwargs:
            value = kwargs.pop(name)
            if value is not None:
                out[key] = value
    return out


def resolve(config_path: str | None, overrides: dict[str, Any]) -> Config:
    """Load the config, turning ConfigError into a clean exit 2 (click.UsageError) with the fix."""
    try:
        return load_config(config_path, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def pass_config(fn: Callable) -> Callable:
    """Decorator: adds the config flags and hands the resolved Config to the command as `cfg`."""

    @config_options
    @functools.wraps(fn)
    def wrapper(config_path: str | None, **kwargs: Any) -> Any:
        overrides = collect_overrides(kwargs)
        return fn(cfg=resolve(config_path, overrides), **kwargs)

    return wrapper

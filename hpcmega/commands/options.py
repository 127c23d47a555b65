"""The config flags of `plan`, `run`, `submit` and `config show`, derived from the field declarations in
hpcmega.config (one flag per field; nothing here names a field).

Every flag defaults to None, meaning "not given", so files and presets keep their values. Layers, lowest first:
``--site`` profile, ``--config`` files (left to right), flags, ``--set`` items.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import click

from hpcmega.config import (
    FIELDS,
    Append,
    Config,
    FieldInfo,
    Resolved,
    Setting,
    parse_set,
    read_toml,
    resolve_defaults,
    resolve_layers,
    site_path,
    toml_safe,
)
from hpcmega.errors import ConfigError

_PREFIX = "cfg__"
# The seeds torch.Generator.manual_seed takes without overflowing (as train.seed declares).
SEED = click.IntRange(0, 2**63 - 1)


class Finite(click.FloatRange):
    """A float flag within bounds that also refuses nan and inf (click's FloatRange lets nan through: every
    comparison with nan is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _param(info: FieldInfo) -> str:
    return _PREFIX + info.key.replace(".", "__")


def _help(info: FieldInfo) -> str:
    s = info.spec
    default = f"{toml_safe(info.default)}" + (f" = {s.zero}" if s.zero and info.default == 0 else "")
    shown = f" [default: {default}]" if info.default not in ("", [], {}) else ""
    return f"{s.help}{shown} (config: {info.key})"


def _option(info: FieldInfo, param: str | None = None) -> Callable:
    kwargs: dict[str, Any] = dict(default=None, help=_help(info))
    if info.spec.choices:
        kwargs["type"] = click.Choice(list(info.spec.choices))
    elif info.is_list:
        kwargs.update(multiple=True, default=(), metavar="TEXT")
    elif info.is_dict:
        kwargs.update(multiple=True, default=(), metavar="KEY=VALUE")
    elif info.value_type is not bool:
        kwargs["type"] = info.value_type
    return click.option(info.decls, param or _param(info), **kwargs)


def field_option(key: str, param: str) -> Callable:
    """Decorator: the flag of one declared field for a command without a config (e.g. --trust-checkpoint of
    `sample`); the command gets it as ``param`` (None when not given)."""
    return _option(FIELDS[key], param)


def field_flags(with_cluster: bool) -> list[FieldInfo]:
    """The fields that get a flag; `run` leaves out [cluster] (it has --nproc and its own --cpu)."""
    return [f for f in FIELDS.values() if f.decls and (with_cluster or not f.key.startswith("cluster."))]


def config_options(with_cluster: bool = True) -> Callable:
    """Decorator: --site, --config (repeatable), --set (repeatable) and one flag per declared field."""

    def decorate(fn: Callable) -> Callable:
        for info in reversed(field_flags(with_cluster)):
            fn = _option(info)(fn)
        fn = click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
                          help="Set any config field, e.g. --set train.min_lr=1e-5 (repeatable; wins over flags).")(fn)
        fn = click.option("--config", "config_paths", multiple=True, type=click.Path(dir_okay=False),
                          help="TOML config file (repeatable: merged left to right).")(fn)
        return click.option("--site", help="Site profile slurm/sites/SITE.toml (applied before --config).")(fn)

    return decorate


def flag_layer(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the field flags out of a command's kwargs into {dotted key: value} (only those given)."""
    out: dict[str, Any] = {}
    for info in FIELDS.values():
        value = kwargs.pop(_param(info), None)
        if value is None or value == ():
            continue
        out[info.key] = Append(value) if info.is_list else value
    return out


def resolve(site: str | None, config_paths: tuple[str, ...], flags: dict[str, Any],
            set_items: tuple[str, ...] = (), base: tuple[str | Path, ...] = ()) -> Resolved:
    """Resolve all layers (``base`` files first: `resume` starts from the run's saved config), a ConfigError is
    a clean exit 2 with the fix (hpcmega.cli)."""
    layers = [(str(p), read_toml(p)) for p in base]
    layers += [(str(site_path(site)), read_toml(site_path(site)))] if site else []
    layers += [(str(p), read_toml(p)) for p in config_paths]
    layers += [(f"flag {FIELDS[k].flag}", {k: v}) for k, v in flags.items()]
    layers.append(("--set", parse_set(set_items)))
    resolved = resolve_layers(layers)
    model = start_model(resolved.config)
    if model is None:
        return resolved
    return resolve_layers(layers[:len(base)] + [model] + layers[len(base):])


def start_model(cfg: Config) -> tuple[str, dict[str, Any]] | None:
    """The layer (source, {model.key: value}) of the model a run starts from: the model section recorded in the
    ``--init-from`` checkpoint (an import records config.json's), or in a ``--resume`` URL's when it is readable
    (a URL that is not fails on the ranks, as before). It sits below the files and flags, which still override."""
    from hpcmega.checkpoint.locate import find_checkpoint

    c = cfg.checkpoint
    source, strict = (c.init_from, True) if c.init_from else (c.resume, False)
    if source in ("", "auto", "none"):
        return None
    try:
        meta = find_checkpoint(source, trust=True).meta  # meta.json only (JSON, nothing unpickled)
    except ConfigError:
        if strict:
            raise
        return None
    model = {f"model.{k}": v for k, v in ((meta.get("config") or {}).get("model") or {}).items() if k != "preset"}
    return f"checkpoint {source}", {k: v for k, v in model.items() if k in FIELDS}


def settle_defaults(cfg: Config, sources: dict[str, str]) -> list[Setting]:
    """Resolve the unset fields of a cluster job (config.resolve_defaults), asking SLURM for the partition's GPUs
    per node only when no layer gives them; -> the settings to show, GPUs per node (with its source) first."""
    c = cfg.cluster
    given = c.gpus_per_node
    gres = None
    if not given and not c.cpu:
        from hpcmega.cluster.slurm import partition_gpus

        gres = partition_gpus(c.partition)
    chosen = resolve_defaults(cfg, gres=gres)
    if given:
        chosen.insert(0, Setting("cluster.gpus_per_node", given, f"from {sources.get('cluster.gpus_per_node')}"))
    for s in chosen:
        sources[s.key] = s.source
    return chosen


def pass_config(fn: Callable | None = None, *, with_cluster: bool = True, sources: bool = False,
                chosen: bool = False) -> Callable:
    """Decorator: adds the config options and hands the resolved Config to the command as `cfg` (and the
    per-key sources as `sources` when asked). With the cluster flags (a cluster job: plan, submit, config show)
    unset values are resolved by rule here (settle_defaults), and `chosen` lists them when asked; `run` resolves
    them once it knows whether the machine has GPUs (hpcmega.cluster.launcher.local_config)."""

    def decorate(fn: Callable) -> Callable:
        @config_options(with_cluster)
        @functools.wraps(fn)
        def wrapper(site: str | None, config_paths: tuple[str, ...], set_items: tuple[str, ...], **kwargs: Any):
            resolved = resolve(site, config_paths, flag_layer(kwargs), set_items)
            settled = settle_defaults(resolved.config, resolved.sources) if with_cluster else []
            if sources:
                kwargs["sources"] = resolved.sources
            if chosen:
                kwargs["chosen"] = settled
            return fn(cfg=resolved.config, **kwargs)

        return wrapper

    return decorate(fn) if fn is not None else decorate

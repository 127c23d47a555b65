"""Sweeps: ``--sweep train.lr=3e-4,6e-4 --sweep parallel.tp=4,8`` -> the cartesian product of points, each one
run folder inside the sweep folder and one task of a single SLURM job array. Pure Python."""
from __future__ import annotations

import itertools
import re
from typing import Any

from hpcmega.config import FIELDS, Config, flatten, parse_set, resolve_layers
from hpcmega.errors import ConfigError


def parse_sweeps(items: tuple[str, ...] | list[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=3e-4,6e-4"]`` -> ``[("train.lr", ["3e-4", "6e-4"])]``; every key a declared field."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not eq or not values:
            raise ConfigError(f"--sweep {item!r}: write section.key=v1,v2,..., e.g. --sweep train.lr=3e-4,6e-4")
        if key not in FIELDS:
            parse_set([f"{key}=0"])  # raises the unknown-key error with the closest key
        if key in (k for k, _ in out):
            raise ConfigError(f"--sweep {key} is given twice; list all its values in one --sweep")
        out.append((key, values))
    return out


def points(sweeps: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product, the first --sweep varying slowest."""
    keys = [k for k, _ in sweeps]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in sweeps))]


def point_name(index: int, point: dict[str, str]) -> str:
    """'00-lr=3e-4-tp=4': a run folder name (and W&B name) that says what the point changes."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{index:02d}-" + "-".join(parts))


def apply_point(cfg: Config, point: dict[str, str]) -> Config:
    """``cfg`` with the point's values on top (read like --set; a swept model preset replaces the shape)."""
    base: dict[str, Any] = flatten(cfg.to_dict(), "config")
    return resolve_layers([("config", base), ("--sweep", parse_set([f"{k}={v}" for k, v in point.items()]))]).config

"""What a run may resume from, decided from a checkpoint's ``meta.json`` alone (pure Python, no torch).

- The model shape must match: DCP would load a 4-layer checkpoint into a 2-layer model silently (it loads the keys
  it is asked for) or fail with a raw tensor-shape traceback.
- A checkpoint outside the run's own checkpoint location must be trusted explicitly: DCP's ``.metadata`` file is a
  Python pickle, so loading it runs whatever code a crafted file contains, on every rank. The same rule holds for
  `sample` and `ckpt export` (hpcmega.checkpoint.locate): a run folder's own checkpoints load, anything else needs
  --trust-checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

from hpcmega.config import Config
from hpcmega.errors import ConfigError

MODEL_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len",
                "tie_embeddings", "qkv_bias")
_FLAG = {"family": "--family", "vocab_size": "--vocab-size", "d_model": "--d-model", "n_layers": "--layers",
         "n_heads": "--heads", "n_kv_heads": "--kv-heads", "ffn_hidden": "--ffn-hidden",
         "max_seq_len": "--max-seq-len", "tie_embeddings": "--set model.tie_embeddings=",
         "qkv_bias": "--set model.qkv_bias="}


def check_model_matches(meta: dict[str, Any], cfg: Config, url: str) -> None:
    saved = (meta.get("config") or {}).get("model") or {}
    diffs = [(k, saved[k], getattr(cfg.model, k)) for k in MODEL_FIELDS if k in saved and saved[k] != getattr(cfg.model, k)]
    if diffs:
        said = ", ".join(f"{k}={want} (this run: {got})" for k, want, got in diffs)
        fix = " ".join(f"{_FLAG[k]}{'' if _FLAG[k].endswith('=') else ' '}{want}" for k, want, _ in diffs)
        raise ConfigError(f"checkpoint {url} was written for another model: {said}; resume with {fix}, "
                          "or start fresh with --resume none")


def _normal(url: str) -> str:
    return os.path.realpath(url) if "://" not in url or url.startswith("file://") else url.rstrip("/")


def is_inside(url: str, location: str) -> bool:
    url, location = _normal(url.removeprefix("file://")), _normal(location.removeprefix("file://"))
    return url == location or url.startswith(location.rstrip("/") + "/")


def check_trusted(url: str, location: str | None, trust: bool, named: str = "--resume") -> None:
    """Refuse to load ``url`` (named on the command line as ``named``) unless it is inside ``location``, the
    checkpoint location of the run it belongs to (None: it belongs to no run folder), or ``trust`` is given."""
    if trust or (location is not None and is_inside(url, location)):
        return
    where = f"outside this run's checkpoint location {location}" if location is not None else \
        "not inside a run folder's checkpoint location"
    raise ConfigError(f"{named} {url} is {where}; loading a checkpoint unpickles its DCP .metadata, which can run "
                      "code: pass --trust-checkpoint if you trust who wrote it")

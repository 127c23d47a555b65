"""Model families, one folder each: ``model.py`` (the nn.Module), ``parallelize.py`` (its tensor-parallel plan) and
``state_dict_adapter.py`` (its Hugging Face import/export). This registry maps a family name to that folder, so
the engine, inference and export ask for a family instead of importing one by name. Importing it imports no torch.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from hpcmega.errors import ConfigError

# family name -> the package holding model.py, parallelize.py and state_dict_adapter.py
FAMILIES: dict[str, str] = {
    "gpt2": "hpcmega.models.gpt2",
    "llama": "hpcmega.models.llama",
}


def family_module(family: str, part: str) -> ModuleType:
    """``family_module("gpt2", "model")`` -> hpcmega.models.gpt2.model (imported on first use)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{FAMILIES[family]}.{part}")

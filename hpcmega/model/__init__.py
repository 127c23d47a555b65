"""The GPT model: one module, split and sharded by :mod:`hpcmega.engine` without renaming its parameters."""
from hpcmega.model.gpt import GPT, Block, build_model, cross_entropy

__all__ = ["GPT", "Block", "build_model", "cross_entropy"]

"""What every model family shares with the engine: layout-independent initialisation, the pipeline split, the loss,
and building a family's model by name (hpcmega.models.FAMILIES).

- A family's model keeps its blocks in an ``nn.ModuleDict`` keyed by their *global* index, its embeddings as
  ``tok_emb`` (and ``pos_emb``), its final norm as ``ln_f`` and its head as ``head``; :func:`keep_stage` turns it into
  one pipeline stage without renaming a parameter, so every checkpoint loads into any layout.
- :class:`RMSNorm` is here (not in the llama family) because the shared tensor-parallel code
  (:func:`hpcmega.models.sharding.norm_on_shard`) runs it on sequence shards.
- :func:`init_weights` gives each matrix element a value that depends only on (seed, parameter name, element) and
  draws only this rank's shard of a DTensor parameter (:mod:`hpcmega.models.init`): any stage on any rank, sharded
  or not, holds the single-process values, in time proportional to the shard.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcmega.config import ModelConfig
from hpcmega.models import family_module
from hpcmega.models.init import normal_

INIT_STD = 0.02
FIRST_STAGE = ("tok_emb", "pos_emb")  # modules only the first pipeline stage holds (a family may lack pos_emb)
LAST_STAGE = ("ln_f", "head")


class PreNormBlock(nn.Module):
    """The residual pre-norm block both families share: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    The engine sets two hooks rather than wrapping the module, so parameter names never depend on the layout:
    ``checkpoint_fn`` (:mod:`hpcmega.parallel.recompute`) runs the body under activation recompute, and
    ``sharded_body`` (the family's ``parallelize``) replaces the body under tensor parallelism with one that computes
    on the local shards of the (DTensor) parameters with a few explicit collectives."""

    def __init__(self, ln1: nn.Module, attn: nn.Module, ln2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp
        self.checkpoint_fn: Callable[..., torch.Tensor] | None = None
        self.sharded_body: Callable[[PreNormBlock, torch.Tensor], torch.Tensor] | None = None

    def body(self, x: torch.Tensor) -> torch.Tensor:
        if self.sharded_body is not None:
            return self.sharded_body(self, x)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_fn is not None:
            return self.checkpoint_fn(self.body, x)
        return self.body(x)


def keep_stage(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """Keep ``layers`` (global indices), the embeddings iff ``first``, final norm and head iff ``last``."""
    for name in list(model.blocks.keys()):
        if int(name) not in layers:
            del model.blocks[name]
    for attr in (() if first else FIRST_STAGE) + (() if last else LAST_STAGE):
        if hasattr(model, attr):
            setattr(model, attr, None)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, n_layers: int, residual: tuple[str, ...]) -> None:
    """GPT-2's scheme for any family: matrices N(0, 0.02), the residual-stream projections (module paths ending in
    ``residual``) N(0, 0.02 / sqrt(2 n_layers)), biases 0, norm weights 1; each matrix from the tiled streams of
    (seed, its name)."""
    residual_std = INIT_STD / math.sqrt(2 * n_layers)
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if module_name.endswith(residual) else INIT_STD
            normal_(module.weight, std, seed, f"{module_name}.weight")
        elif isinstance(getattr(module, "weight", None), torch.Tensor):  # a norm (LayerNorm, RMSNorm)
            module.weight.fill_(1.0)
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            module.bias.zero_()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in fp32 and cast back before the weight, as HF's LlamaRMSNorm (bf16 logits then agree)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def new_model(cfg: ModelConfig) -> nn.Module:
    """The family's model for ``cfg`` on the current default device (the engine builds on meta)."""
    return family_module(cfg.family, "model").Model(cfg)


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """The full model, initialised; for a single process and for tests."""
    with torch.device("meta"):
        model = new_model(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy, always on fp32 logits (bf16 logits lose too much in log-softmax)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))

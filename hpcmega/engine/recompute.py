"""Activation recompute (``parallel.recompute``): trade backward-pass compute for activation memory.

- ``none``: autograd keeps every tensor the backward needs.
- ``full``: each block keeps only its input; the whole block is re-run during backward (one extra forward).
- ``selective``: each block keeps its input plus the results of the expensive operations -- matrix multiplies,
  attention and tensor-parallel collectives -- and recomputes the cheap, memory-heavy rest during backward:
  LayerNorm outputs, the GELU output (4h wide), the re-laid-out attention output and residual sums. This is the
  Korthikanti et al. (2022) idea of recomputing what costs much memory but few FLOPs; with fused attention (SDPA)
  the s x s attention matrix is never stored, so the savings here come from norms and activations rather than the
  attention core. Extra cost: elementwise work only, no matmul and no communication is repeated.

Both modes use non-reentrant ``torch.utils.checkpoint`` inside :class:`hpcmega.model.gpt.Block`, so parameter
names are unchanged and gradients are bitwise identical to ``none``.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from hpcmega.config import RECOMPUTE_MODES
from hpcmega.model.gpt import GPT


def _ops(namespace: Any, names: tuple[str, ...]) -> set:
    return {getattr(namespace, n).default for n in names if hasattr(namespace, n)}


# Results of these operations are kept; everything else inside a block is recomputed.
SAVED_OPS = _ops(
    torch.ops.aten,
    (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ),
) | _ops(torch.ops._c10d_functional, ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"))


def _selective_policy(_ctx: Any, op: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_recompute(model: GPT, mode: str) -> None:
    """Set every block of ``model`` to recompute according to ``mode`` (none | selective | full)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        fn = None
    elif mode == "full":
        fn = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    else:
        fn = functools.partial(
            checkpoint, use_reentrant=False, preserve_rng_state=False, context_fn=_selective_contexts
        )
    for block in model.blocks.values():
        block.checkpoint_fn = fn

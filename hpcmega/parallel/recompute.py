"""Activation recompute (``parallel.recompute``): trade backward-pass compute for activation memory.

- ``none``: autograd keeps every tensor the backward needs.
- ``full``: each block keeps only its input; the whole block is re-run during backward (one extra forward).
- ``selective``: each block keeps its input plus the results of the expensive operations -- matrix multiplies,
  attention and the reductions over "tp" -- and recomputes the cheap, memory-heavy rest during backward:
  LayerNorm outputs, the GELU output (4h wide), the re-laid-out attention output and residual sums. This is the
  Korthikanti et al. (2022) idea of recomputing what costs much memory but few FLOPs; with fused attention (SDPA)
  the s x s attention matrix is never stored, so the savings here come from norms and activations rather than the
  attention core.

  Under tensor + sequence parallelism two kinds of result are *not* kept, because each is t times larger than the
  sequence shard it comes from: all-gather outputs (the full-sequence input of a column-parallel matmul; backward
  gathers again, as Megatron does) and row-parallel partial sums (a matmul contracting a "tp"-sharded dimension,
  whose only consumer is the reduce-scatter, which is kept). The TP block computes on plain local shards
  (:mod:`hpcmega.models.gpt2.parallelize`), so a partial sum cannot be told from its arguments: the block runs its
  row-parallel matmuls inside :func:`partial_sums`, and the policy reads that mark (forward and recompute run the
  same code, so both see the same decisions). Per rank the bytes then fall as 1/t (34 s·b·h/t in
  the paper, 22.5 s·b·h/t here in bf16; tests/test_recompute.py). Extra backward cost with TP: the two all-gathers
  and the attention output projection (1 of the block's 6 matmuls) run again; without TP, elementwise work only.

Both modes use non-reentrant ``torch.utils.checkpoint`` inside :class:`hpcmega.models.gpt2.model.Block`, so parameter
names are unchanged and gradients are bitwise identical to ``none``.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from hpcmega.config import RECOMPUTE_MODES
from hpcmega.models.partial_sums import in_partial_sums


def _ops(namespace: Any, names: tuple[str, ...]) -> set:
    return {getattr(namespace, n).default for n in names if hasattr(namespace, n)}


MATMULS = _ops(torch.ops.aten, ("mm", "addmm", "bmm", "baddbmm"))
ATTENTION = _ops(
    torch.ops.aten,
    (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ),
)
# Results of reductions over "tp" are sequence shards (SP) or what the residual stream needs; all-gathers are not
# kept (their output is the full sequence, t times the shard they came from): backward gathers again, as Megatron.
REDUCTIONS = _ops(torch.ops._c10d_functional, ("reduce_scatter_tensor", "all_reduce"))


def _selective_policy(_ctx: Any, op: Any, *_args: Any, **_kwargs: Any) -> CheckpointPolicy:
    if op in ATTENTION or op in REDUCTIONS or (op in MATMULS and not in_partial_sums()):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_recompute(model: nn.Module, mode: str) -> None:
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

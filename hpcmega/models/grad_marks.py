"""The mark a model's tensor-parallel code puts on modules whose replicated parameters get partial gradients.

Under sequence parallelism a norm (or a row-parallel bias) is replicated over "tp" but applied to this rank's
sequence shard only, so each rank's local gradient is its share of a sum over tp. The model's TP code computes on
``param.to_local()`` (autograd and FSDP2 pass that gradient through untouched) and declares the module here;
:mod:`hpcmega.parallel.grad_sync` finds the declared modules once the model is built and sums all their gradients
in one fp32 all-reduce per step. Here, below both, so every model family declares them the same way. The mark is
on the module, not the parameter: FSDP2 and ``to_empty`` replace parameter objects after the TP code has run.
"""
from __future__ import annotations

import torch.nn as nn

_DECLARED = "grad_sums_over_tp"


def declare_partial_grads(module: nn.Module) -> None:
    """The parameters of ``module`` (and of its children) replicated over "tp" see only this rank's sequence
    shard: their local gradients are partial sums over tp."""
    setattr(module, _DECLARED, True)


def declares_partial_grads(module: nn.Module) -> bool:
    return getattr(module, _DECLARED, False)

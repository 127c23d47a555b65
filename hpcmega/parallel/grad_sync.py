"""Gradient reductions the engine owes after backward: always in fp32, always fused (one all-reduce per step).

With sequence parallelism every LayerNorm weight and bias, and the row-parallel (wo, fc2) biases added after the
reduce-scatter, is replicated over "tp" but only sees this rank's sequence shard, so its local gradient is this
rank's share of a sum over tp. Left to DTensor (a ``Partial`` gradient) it would be reduced one tensor at a time:
by FSDP2, which redistributes each DTensor gradient to its parameter's placements before its reduce-scatter -- in
the compute dtype (bf16) when nothing accumulated, fp32 when it did -- or by ``redistribute`` here: 6 all-reduces
per block + 2 for the final norm, each paying the full collective latency (measured with ``hpcmega bench --comm``:
14 one-dimensional bf16 all-reduces per step on a 2-block tp2 model with one microbatch).

Instead the model's tensor-parallel code declares those modules (:mod:`hpcmega.models.grad_marks`, before FSDP2),
their gradients pass autograd and FSDP2 as they are (neither reduces them over tp), and
:func:`reduce_partial_grads` sums them over tp after backward -- after FSDP2's reduce-scatter over "dp", on the dp
shards, which is exact (sums over dp and tp commute) and moves 1/dp of the bytes -- in one flat fp32 buffer per
group, whatever the microbatch count or compute precision. It must run before anything reads the gradients (the
trainer calls it right after the forward/backward of a step; clipping and the optimizer come after).

Gradients that still arrive as ``Partial`` DTensors (any other code that declares them so) are reduced the same way:
fused, fp32.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from hpcmega.models.grad_marks import declares_partial_grads

# On a parameter (set by mark_partial_grads once the model is built): its local gradient is a partial sum over tp.
PARTIAL_OVER_TP = "grad_partial_over_tp"


def _tp_replicated(param: torch.Tensor) -> bool:
    if not isinstance(param, DTensor) or "tp" not in (param.device_mesh.mesh_dim_names or ()):
        return False
    return isinstance(param.placements[param.device_mesh.mesh_dim_names.index("tp")], Replicate)


def mark_partial_grads(model: nn.Module) -> None:
    """Once ``model`` is built (after FSDP2 and ``to_empty``, which replace parameter objects): tag the parameters
    of the declared modules for :func:`reduce_partial_grads`."""
    for module in model.modules():
        if declares_partial_grads(module):
            for param in module.parameters():
                if _tp_replicated(param):
                    setattr(param, PARTIAL_OVER_TP, True)


def _partial_dims(grad: DTensor, param: DTensor) -> list[int] | None:
    """Mesh dims where a Partial(sum) gradient must become its Replicate parameter; None for anything else (left to
    ``redistribute``)."""
    changed = [i for i, (g, p) in enumerate(zip(grad.placements, param.placements)) if g != p]
    fusable = all(isinstance(grad.placements[i], Partial) and grad.placements[i].reduce_op == "sum"
                  and isinstance(param.placements[i], Replicate) for i in changed)
    return changed if changed and fusable else None


@torch.no_grad()
def reduce_partial_grads(params: Iterable[torch.Tensor]) -> int:
    """Sum every partial gradient over its group (tagged parameters over "tp", ``Partial`` DTensor gradients over
    their Partial mesh dims), one fp32 all-reduce per group; returns the number of collectives issued."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    issued = 0
    for p in params:
        g = p.grad
        if not isinstance(g, DTensor):
            continue
        mesh = g.device_mesh
        if getattr(p, PARTIAL_OVER_TP, False):
            groups[(mesh, (mesh.mesh_dim_names.index("tp"),))].append(p)
        elif g.placements != p.placements:
            dims = _partial_dims(g, p)
            if dims is None:
                p.grad = g.redistribute(placements=p.placements)
                issued += 1
            else:
                groups[(mesh, tuple(dims))].append(p)
    for (mesh, dims), members in groups.items():
        locals_ = [p.grad.to_local() for p in members]
        flat = torch.cat([t.reshape(-1).float() for t in locals_])
        for dim in dims:
            dist.all_reduce(flat, group=mesh.get_group(dim))
            issued += 1
        for p, t, chunk in zip(members, locals_, flat.split([t.numel() for t in locals_])):
            t.copy_(chunk.view_as(t))
            if p.grad.placements != p.placements:  # a Partial gradient: now its parameter's placements
                p.grad = DTensor.from_local(t, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return issued

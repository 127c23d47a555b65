"""Gradient reductions the engine owes after backward, fused: one all-reduce per step instead of one per tensor.

With sequence parallelism every LayerNorm weight and bias, and the row-parallel (wo, fc2) biases added after the
reduce-scatter, is replicated over "tp", but its gradient leaves backward as a ``Partial`` DTensor (each TP rank
summed only its own sequence shard; :mod:`hpcmega.models.gpt2.parallelize` declares it so). Redistributing each one to
``Replicate`` costs one all-reduce per tensor -- 6 per block + 2 for the final norm, 26 tiny collectives per step on
a 4-layer model, each paying the full collective latency (measured with ``hpcmega bench --comm``). Here they travel
in one flat buffer per (mesh, placements, dtype): exact, since every element is the same sum of the same tp values;
only the buffer changes. FSDP2 reduces the gradients it owns itself; this is for the parameters it does not wrap
(no dp, no bf16), and it must run before any optimizer or norm op would re-reduce a ``Partial`` gradient.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate


def _fusable(grad: DTensor, param: DTensor) -> bool:
    """Partial(sum) -> Replicate on every dimension where they differ; anything else is left to redistribute."""
    changed = [(g, p) for g, p in zip(grad.placements, param.placements) if g != p]
    return bool(changed) and all(
        isinstance(g, Partial) and g.reduce_op == "sum" and isinstance(p, Replicate) for g, p in changed
    )


@torch.no_grad()
def reduce_partial_grads(params: Iterable[torch.Tensor]) -> int:
    """Make every DTensor gradient carry its parameter's placements; returns the number of all-reduces issued."""
    fused: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    issued = 0
    for p in params:
        g = p.grad
        if not isinstance(g, DTensor) or g.placements == p.placements:
            continue
        if _fusable(g, p):
            fused[(g.device_mesh, g.placements, p.placements, g.dtype)].append(p)
        else:
            p.grad = g.redistribute(placements=p.placements)
            issued += 1
    for (mesh, grad_placements, placements, _dtype), group in fused.items():
        locals_ = [p.grad.to_local() for p in group]
        flat = torch.cat([t.reshape(-1) for t in locals_])
        for dim, (g, want) in enumerate(zip(grad_placements, placements)):
            if g != want:
                dist.all_reduce(flat, group=mesh.get_group(dim))
                issued += 1
        for p, t, chunk in zip(group, locals_, flat.split([t.numel() for t in locals_])):
            p.grad = DTensor.from_local(chunk.view_as(t), mesh, placements, run_check=False)
    return issued

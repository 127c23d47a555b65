"""Tensor parallelism shared by every model family: DTensor parameters, local block math, one plan for the ends.

Each family's ``parallelize.py`` says which block Linears are column-parallel (output features: weight and bias
``Shard(0)``) and which are row-parallel (input features: weight ``Shard(1)``, bias replicated and added after the
reduce), and writes its block's forward on local shards with :class:`ShardedOps`: plain ops on the parameters'
local shards (``to_local``) and DTensor ``redistribute`` only where activations must move -- the input of the
column-parallel matmuls (all-gather with SP; identity forward, all-reduce backward without) and the output of the
row-parallel ones (reduce-scatter with SP; all-reduce without). Eager DTensor on every op costs sharding propagation
in forward and backward (the profile in docs/performance.md); this does not.

Every parameter is a DTensor on the tp mesh (so DCP, FSDP2, clipping, initialisation and checkpoints see one sharded
model with full-model names). ``to_local(grad_placements=...)`` tells autograd what each local gradient is: a shard
of a sharded parameter, or -- for norms and row-parallel biases, which under SP only see this rank's sequence shard
-- a ``Partial`` sum that :mod:`hpcmega.parallel.grad_sync` (or FSDP2) reduces once per step.

The ends of the model: embeddings vocab- (and position-) parallel, the final norm on sequence shards (SP) or
replicated, the head column-parallel with its logits left sharded over the vocabulary (the loss runs under
``loss_parallel()``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from hpcmega.models.partial_sums import partial_sums


class ReplicateParallel(ParallelStyle):
    """Norms without sequence parallelism: parameters become Replicate DTensors (so every parameter of a TP model is
    a DTensor on the same mesh, which FSDP2 and the grad-norm reduction expect); activations stay plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

        def to_local(_mod, outputs, _mesh):
            return outputs.to_local()

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=to_local)


def shard_ends(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Embeddings (``tok_emb``, and ``pos_emb`` where the family has one), final norm ``ln_f`` and ``head`` of a
    full model or pipeline stage (those it holds)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, ParallelStyle] = {}
    for name in ("tok_emb", "pos_emb"):
        if getattr(model, name, None) is not None:
            top[name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.ln_f is not None:
        top["ln_f"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    if getattr(model, "head", None) is not None:
        top["head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)


def shard_block_params(block: nn.Module, mesh: DeviceMesh, column: tuple[str, ...], row: tuple[str, ...]) -> None:
    """Split the block's ``column`` Linears by output features and its ``row`` Linears by input features (paths
    inside the block); every other parameter becomes a Replicate DTensor. Shapes only on meta."""

    def partition(path: str, module: nn.Module, mesh: DeviceMesh) -> None:
        split: dict[str, Placement] = {}
        if path in column:
            split = {"weight": Shard(0), "bias": Shard(0)}
        elif path in row:
            split = {"weight": Shard(1)}
        for name, placement in split.items():
            param = getattr(module, name, None)
            if param is None:
                continue
            sharded = distribute_tensor(param, mesh, [placement], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))

    distribute_module(block, mesh, partition)


def local(param: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a sharded parameter (its gradient is the shard's); None stays None."""
    return None if param is None else param.to_local()


class ShardedOps:
    """The collectives and parameter views a block body on local shards needs. The residual stream ``x`` is this
    rank's sequence shard [b, s/t, d] with SP, the whole [b, s, d] without."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.mesh = mesh
        self.residual: Placement = Shard(1) if sequence_parallel else Replicate()
        # Gradient of a replicated parameter used on a sequence shard: this rank's share of the sum.
        self.replicated_grad: Placement = Partial() if sequence_parallel else Replicate()

    def replicated(self, param: torch.Tensor | None) -> torch.Tensor | None:
        """A replicated parameter (norm, row-parallel bias) applied to the residual layout."""
        return None if param is None else param.to_local(grad_placements=[self.replicated_grad])

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Residual layout -> the whole sequence on every rank; backward sums the column-parallel input gradients
        over tp (reduce-scatter with SP, all-reduce without)."""
        d = DTensor.from_local(x, self.mesh, [self.residual], run_check=False)
        return d.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])

    def row_parallel(self, x: torch.Tensor, row: nn.Linear) -> torch.Tensor:
        """The row-parallel matmul, then its partial sums -> residual layout (reduce-scatter with SP, all-reduce
        without), plus the bias if the Linear has one."""
        with partial_sums():  # tells selective recompute what this matmul's result is (plain tensors carry no tag)
            partial = F.linear(x, row.weight.to_local())
        d = DTensor.from_local(partial, self.mesh, [Partial()], run_check=False)
        out = d.redistribute(self.mesh, [self.residual]).to_local()
        return out if row.bias is None else out + self.replicated(row.bias)

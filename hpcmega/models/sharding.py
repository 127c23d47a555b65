"""Tensor parallelism shared by every model family: DTensor parameters, local block math, one plan for the ends.

Each family's ``parallelize.py`` says which block Linears are column-parallel (output features: weight and bias
``Shard(0)``) and which are row-parallel (input features: weight ``Shard(1)``, bias replicated and added after the
reduce), and writes its block's forward on local shards with :class:`ShardedOps`: plain ops on the parameters'
local shards (``to_local``) and DTensor ``redistribute`` only where activations must move -- the input of the
column-parallel matmuls (all-gather with SP; identity forward, all-reduce backward without) and the output of the
row-parallel ones (reduce-scatter with SP; all-reduce without). Eager DTensor on every op costs sharding propagation
in forward and backward (the profile in docs/performance.md); this does not.

Every parameter is a DTensor on the tp mesh (so DCP, FSDP2, clipping, initialisation and checkpoints see one sharded
model with full-model names). The local gradient of a sharded parameter is its shard. Replicated parameters that
see only part of the work on each rank -- under SP the norms and row-parallel biases (this rank's sequence shard) --
get local gradients that are partial sums over tp: the family declares those modules
(:mod:`hpcmega.models.grad_marks`) and :mod:`hpcmega.parallel.grad_sync` sums them in one fp32 all-reduce per step.

The ends of the model (:func:`shard_ends`): embeddings vocab- (and position-) parallel on their local shard, the
final norm on sequence shards (SP) or replicated, the head column-parallel with its logits left sharded over the
vocabulary (the loss runs under ``loss_parallel()``, :func:`hpcmega.parallel.loss.loss_context`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, parallelize_module

from hpcmega.models.common import RMSNorm, rms_norm
from hpcmega.models.grad_marks import declare_partial_grads
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


class VocabParallelEmbedding(ParallelStyle):
    """An ``nn.Embedding`` split over its rows (the vocabulary, Megatron's vocab-parallel embedding), computed on the
    local shard: ids outside this rank's rows look up row 0 and are zeroed, the partial sums are reduced into
    ``output`` (reduce-scatter to the sequence shard with SP, all-reduce without) and returned as a plain tensor.

    Why not ``RowwiseParallel`` on the DTensor op: DTensor has no row-wise rule for ``embedding_dense_backward``, so
    the gradient came back as a Replicate DTensor of the full (vocab, d) table on every rank (gpt-7b at tp = 8: 50304
    rows instead of 6288, +0.7 GiB at stage 0's peak). Here backward runs ``F.embedding``'s backward on the local
    weight: the gradient is born as this rank's ``Shard(0)`` rows. Needs rows divisible by the tp size (checked at
    build: equal row blocks, rank r holds rows [r * n, (r + 1) * n))."""

    def __init__(self, output: Placement) -> None:
        super().__init__()
        self.output = output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding applies to nn.Embedding, not {type(module).__name__}")
        weight = distribute_tensor(module.weight, device_mesh, [Shard(0)], src_data_rank=None)  # meta: shapes only
        module.register_parameter("weight", nn.Parameter(weight, requires_grad=module.weight.requires_grad))
        module.forward = functools.partial(self._lookup, module, device_mesh)  # instance attribute: names unchanged
        return module

    def _lookup(self, module: nn.Embedding, mesh: DeviceMesh, ids: torch.Tensor) -> torch.Tensor:
        rows = module.weight.to_local()  # its gradient: this rank's rows, Shard(0) like the parameter
        local = ids - mesh.get_local_rank() * rows.shape[0]
        outside = (local < 0) | (local >= rows.shape[0])
        partial = F.embedding(local.masked_fill(outside, 0), rows).masked_fill(outside.unsqueeze(-1), 0.0)
        d = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
        return d.redistribute(mesh, [self.output]).to_local()


class SequenceParallelNorm(ParallelStyle):
    """A norm on this rank's sequence shard (SP): replicated DTensor parameters, plain local tensors in and out,
    computed on the parameters' local values; their gradients are partial sums over tp (declared to grad_sync)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh)  # parameters -> Replicate DTensors
        module.forward = functools.partial(norm_on_shard, module)  # instance attribute: names unchanged
        declare_partial_grads(module)
        return module


def norm_on_shard(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (LayerNorm or RMSNorm with replicated DTensor parameters) applied to the plain tensor ``x`` with the
    parameters' local values."""
    local = {name: p.to_local() for name, p in norm.named_parameters()}
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, local.get("weight"), local.get("bias"), norm.eps)
    if isinstance(norm, RMSNorm):
        return rms_norm(x, local["weight"], norm.eps)
    raise TypeError(f"no sharded forward for {type(norm).__name__}; add one to norm_on_shard")


def shard_ends(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Embeddings (``tok_emb``, and ``pos_emb`` where the family has one), final norm ``ln_f`` and ``head`` of a
    full model or pipeline stage (those it holds)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, ParallelStyle] = {}
    for name in ("tok_emb", "pos_emb"):
        if getattr(model, name, None) is not None:
            top[name] = VocabParallelEmbedding(residual)
    if model.ln_f is not None:
        top["ln_f"] = SequenceParallelNorm() if sequence_parallel else ReplicateParallel()
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
    """This rank's part of a parameter (its gradient is the same part's); None stays None."""
    return None if param is None else param.to_local()


class ShardedOps:
    """The collectives a block body on local shards needs. The residual stream ``x`` is this rank's sequence shard
    [b, s/t, d] with SP, the whole [b, s, d] without."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.mesh = mesh
        self.residual: Placement = Shard(1) if sequence_parallel else Replicate()

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
        return out if row.bias is None else out + row.bias.to_local()

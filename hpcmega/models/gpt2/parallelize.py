"""Tensor parallelism (Megatron-style) with optional sequence parallelism: DTensor parameters, local block math.

Per block: wq/wk/wv and fc1 are split by output columns, wo and fc2 by input rows, so each block needs one
all-reduce (TP) or one all-gather + one reduce-scatter (TP+SP) per sub-layer. With sequence parallelism the residual
stream between sub-layers is sharded along the sequence (dim 1) and the LayerNorms run on their sequence shard.
Embeddings are vocab- (and position-) parallel (:class:`VocabParallelEmbedding`: each rank looks up only the rows it
holds, so the embedding's gradient is this rank's rows, never the full table); the head is column-parallel and its
logits stay sharded over the vocabulary, so the loss must run under ``loss_parallel()``
(:func:`hpcmega.parallel.loss.loss_context`).

Every parameter is a DTensor (so DCP, FSDP2, clipping, initialisation and checkpoints see one sharded model with
full-model names), but the blocks do not compute on DTensors: eager DTensor pays sharding propagation and
redistribution checks on every op of forward and backward (the profile in docs/performance.md). A block runs
:class:`BlockOnShards` instead: plain ops on the parameters' local shards (``to_local``), and DTensor
``redistribute`` only at the two points per sub-layer where activations must move -- the input of the
column-parallel matmuls (all-gather with SP; identity forward, all-reduce backward without) and the output of the
row-parallel one (reduce-scatter with SP; all-reduce without). The local gradient of a sharded parameter is its
shard. The LayerNorms (final norm included) and the row-parallel biases are replicated, but under SP they only see
this rank's sequence shard, so their local gradients are partial sums over tp: those modules are declared
(:mod:`hpcmega.models.grad_marks`) and :mod:`hpcmega.parallel.grad_sync` sums all of them in one fp32 all-reduce per
step (after FSDP2's reduce-scatter), instead of DTensor / FSDP2 reducing each one on its own in the compute dtype.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    parallelize_module,
)

from hpcmega.models.grad_marks import declare_partial_grads
from hpcmega.models.partial_sums import partial_sums
from hpcmega.models.gpt2.model import GPT, Block

# Block parameters split over tp (module path -> placement of weight and bias); everything else is replicated.
COLUMN_PARALLEL = ("attn.wq", "attn.wk", "attn.wv", "mlp.fc1")  # output features: weight and bias Shard(0)
ROW_PARALLEL = ("attn.wo", "mlp.fc2")  # input features: weight Shard(1), bias replicated (added after the reduce)


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
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, local.get("weight"), norm.eps)
    raise TypeError(f"no sharded forward for {type(norm).__name__}; add one to norm_on_shard")


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a full model or one pipeline stage) in place over ``tp_mesh``."""
    residual = Shard(1) if sequence_parallel else Replicate()

    def norm_style() -> ParallelStyle:
        return SequenceParallelNorm() if sequence_parallel else ReplicateParallel()

    top: dict[str, ParallelStyle] = {}
    if model.tok_emb is not None:
        top["tok_emb"] = VocabParallelEmbedding(residual)
        top["pos_emb"] = VocabParallelEmbedding(residual)
    if model.ln_f is not None:
        top["ln_f"] = norm_style()
        top["head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)

    body = BlockOnShards(tp_mesh, sequence_parallel)
    for block in model.blocks.values():
        distribute_module(block, tp_mesh, _shard_block_params)
        block.sharded_body = body
        if sequence_parallel:  # its norms and row-parallel biases see one sequence shard
            declare_partial_grads(block)


def _shard_block_params(path: str, module: nn.Module, mesh: DeviceMesh) -> None:
    """``distribute_module`` partition function: split the column/row-parallel Linears (the rest it replicates)."""
    split: dict[str, Placement] = {}
    if path in COLUMN_PARALLEL:
        split = {"weight": Shard(0), "bias": Shard(0)}
    elif path in ROW_PARALLEL:
        split = {"weight": Shard(1)}
    for name, placement in split.items():
        param = getattr(module, name)
        sharded = distribute_tensor(param, mesh, [placement], src_data_rank=None)  # meta: shapes only
        module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


class BlockOnShards:
    """A block's forward on local shards; the residual stream ``x`` is this rank's sequence shard [b, s/t, d] with
    SP, the whole [b, s, d] without. Four collectives per block forward and four backward, as explicit TP."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.mesh = mesh
        self.residual: Placement = Shard(1) if sequence_parallel else Replicate()

    def __call__(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(block, self._enter(norm_on_shard(block.ln1, x)))
        return x + self._mlp(block, self._enter(norm_on_shard(block.ln2, x)))

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        """Residual layout -> the whole sequence on every rank; backward sums the column-parallel input gradients
        over tp (reduce-scatter with SP, all-reduce without)."""
        d = DTensor.from_local(x, self.mesh, [self.residual], run_check=False)
        return d.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])

    def _exit(self, partial: torch.Tensor, row: nn.Linear) -> torch.Tensor:
        """Row-parallel partial sums -> residual layout (reduce-scatter with SP, all-reduce without), plus the bias."""
        d = DTensor.from_local(partial, self.mesh, [Partial()], run_check=False)
        return d.redistribute(self.mesh, [self.residual]).to_local() + row.bias.to_local()

    @staticmethod
    def _row_parallel_matmul(x: torch.Tensor, row: nn.Linear) -> torch.Tensor:
        with partial_sums():  # tells selective recompute what this matmul's result is (plain tensors carry no tag)
            return F.linear(x, row.weight.to_local())

    def _attention(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        a = block.attn
        b, s, _ = x.shape
        q, k, v = (
            F.linear(x, lin.weight.to_local(), lin.bias.to_local()).view(b, s, -1, a.head_dim).transpose(1, 2)
            for lin in (a.wq, a.wk, a.wv)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        return self._exit(self._row_parallel_matmul(y, a.wo), a.wo)

    def _mlp(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        m = block.mlp
        h = F.gelu(F.linear(x, m.fc1.weight.to_local(), m.fc1.bias.to_local()), approximate="tanh")
        return self._exit(self._row_parallel_matmul(h, m.fc2), m.fc2)



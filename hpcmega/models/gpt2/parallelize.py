"""GPT-2's tensor-parallel plan (Megatron-style, optional sequence parallelism) on the shared pieces of
:mod:`hpcmega.models.sharding` (DTensor parameters, local block math, vocab-parallel embeddings and head).

Per block: wq/wk/wv and fc1 are split by output columns, wo and fc2 by input rows, so each block needs one
all-reduce (TP) or one all-gather + one reduce-scatter (TP+SP) per sub-layer. With sequence parallelism the residual
stream between sub-layers is sharded along the sequence (dim 1) and the LayerNorms run on their sequence shard: the
LayerNorms (final norm included) and the row-parallel biases are replicated but see only this rank's sequence shard,
so the block is declared (:mod:`hpcmega.models.grad_marks`) and :mod:`hpcmega.parallel.grad_sync` sums their
gradients over tp once per step. Token and position embeddings are both vocab-/row-parallel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from hpcmega.models.gpt2.model import GPT, Block
from hpcmega.models.grad_marks import declare_partial_grads
from hpcmega.models.sharding import ShardedOps, norm_on_shard, shard_block_params, shard_ends

# Block parameters split over tp (module path -> placement of weight and bias); everything else is replicated.
COLUMN_PARALLEL = ("attn.wq", "attn.wk", "attn.wv", "mlp.fc1")  # output features: weight and bias Shard(0)
ROW_PARALLEL = ("attn.wo", "mlp.fc2")  # input features: weight Shard(1), bias replicated (added after the reduce)


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a full model or one pipeline stage) in place over ``tp_mesh``."""
    shard_ends(model, tp_mesh, sequence_parallel)
    body = BlockOnShards(tp_mesh, sequence_parallel)
    for block in model.blocks.values():
        shard_block_params(block, tp_mesh, COLUMN_PARALLEL, ROW_PARALLEL)
        block.sharded_body = body
        if sequence_parallel:  # its norms and row-parallel biases see one sequence shard
            declare_partial_grads(block)


class BlockOnShards(ShardedOps):
    """A block's forward on local shards; the residual stream ``x`` is this rank's sequence shard [b, s/t, d] with
    SP, the whole [b, s, d] without. Four collectives per block forward and four backward, as explicit TP."""

    def __call__(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(block, self.enter(norm_on_shard(block.ln1, x)))
        return x + self._mlp(block, self.enter(norm_on_shard(block.ln2, x)))

    def _attention(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        a = block.attn
        b, s, _ = x.shape
        q, k, v = (
            F.linear(x, lin.weight.to_local(), lin.bias.to_local()).view(b, s, -1, a.head_dim).transpose(1, 2)
            for lin in (a.wq, a.wk, a.wv)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        return self.row_parallel(y, a.wo)

    def _mlp(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        m = block.mlp
        h = F.gelu(F.linear(x, m.fc1.weight.to_local(), m.fc1.bias.to_local()), approximate="tanh")
        return self.row_parallel(h, m.fc2)

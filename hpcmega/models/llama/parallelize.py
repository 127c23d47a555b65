"""Tensor (and sequence) parallelism for the llama block, on :mod:`hpcmega.models.sharding`'s shared pieces.

Per block: wq, gate and up are split by output columns, wo and down by input rows: one all-reduce (TP) or one
all-gather + one reduce-scatter (TP+SP) per sub-layer, as GPT-2. The RMSNorms run on the residual layout (sequence
shards with SP, their weight gradients then partial sums over tp, declared to hpcmega.parallel.grad_sync), RoPE and
attention on this rank's heads.

Grouped-query attention, n_kv_heads = k over t ranks (validation allows t | k or k | t):
- t divides k: wk/wv are column-parallel like wq; rank r holds kv heads [r k/t, (r+1) k/t), exactly the ones its
  query heads [r n/t, (r+1) n/t) use.
- t > k (kv heads replicated): the t/k ranks whose query heads share one kv head all need it. wk/wv stay whole on
  every rank (Replicate), and each rank projects only the rows of its one kv head; the weight gradient of a rank is
  then its kv head's rows only, a partial sum over tp: the modules are declared (hpcmega.models.grad_marks) and
  hpcmega.parallel.grad_sync sums them once per step, like the norms' under SP. Per rank this keeps head_dim-wide
  k and v activations instead of k/t x head_dim.
:func:`hpcmega.planning.families.kv_heads_replicated` is the one rule both this code and the planner follow.

Tied embeddings: the head is the embedding's vocab-sharded weight (Shard(0), the same placement a column-parallel
head weight has), applied to the gathered final-norm output; logits stay sharded over the vocabulary.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from hpcmega.models.grad_marks import declare_partial_grads
from hpcmega.models.llama.model import Block, Llama, attend
from hpcmega.models.sharding import ShardedOps, local, norm_on_shard, shard_block_params, shard_ends
from hpcmega.planning.families import kv_heads_replicated

COLUMN_PARALLEL = ("attn.wq", "mlp.gate", "mlp.up")
KV = ("attn.wk", "attn.wv")  # column-parallel too unless the kv heads are replicated
ROW_PARALLEL = ("attn.wo", "mlp.down")


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a full model or one pipeline stage) in place over ``tp_mesh``."""
    shard_ends(model, tp_mesh, sequence_parallel)
    if model.tok_emb is not None and model.ln_f is not None and model.head is None:
        residual = Shard(1) if sequence_parallel else Replicate()
        model.tied_logits = functools.partial(vocab_parallel_logits, residual)
    replicate_kv = kv_heads_replicated(model.cfg.family, model.cfg.kv_heads, tp_mesh.size())
    column = COLUMN_PARALLEL + (() if replicate_kv else KV)
    body = BlockOnShards(tp_mesh, sequence_parallel, replicate_kv)
    for block in model.blocks.values():
        shard_block_params(block, tp_mesh, column, ROW_PARALLEL)
        block.sharded_body = body
        if sequence_parallel:  # its RMSNorms see one sequence shard (and replicated k/v weights one kv head)
            declare_partial_grads(block)
        elif replicate_kv:  # without SP the norms see the whole sequence: only k/v are partial
            declare_partial_grads(block.attn.wk)
            declare_partial_grads(block.attn.wv)


def vocab_parallel_logits(residual: Placement, x: torch.Tensor, weight: DTensor) -> DTensor:
    """Logits sharded over the vocabulary from the vocab-sharded embedding weight (tied head); ``x`` is the final
    norm's local output in the residual layout (this rank's sequence shard with SP), gathered first as a
    column-parallel head's input is."""
    x = DTensor.from_local(x, weight.device_mesh, [residual], run_check=False)
    return F.linear(x.redistribute(placements=[Replicate()]), weight)


class BlockOnShards(ShardedOps):
    """The llama block's forward on local shards: four collectives forward and four backward, as GPT-2's."""

    def __init__(self, mesh: DeviceMesh, sequence_parallel: bool, replicate_kv: bool) -> None:
        super().__init__(mesh, sequence_parallel)
        self.replicate_kv = replicate_kv

    def __call__(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(block, self.enter(norm_on_shard(block.ln1, x)))
        return x + self._mlp(block, self.enter(norm_on_shard(block.ln2, x)))

    def _kv(self, x: torch.Tensor, lin, head_dim: int, kv_heads: int) -> torch.Tensor:
        if not self.replicate_kv:
            return F.linear(x, lin.weight.to_local(), local(lin.bias))
        # Replicated: project only the kv head this rank's query heads share (rank r of t: head r // (t / k)).
        head = self.mesh.get_local_rank() // (self.mesh.size() // kv_heads)
        rows = slice(head * head_dim, (head + 1) * head_dim)
        bias = None if lin.bias is None else lin.bias.to_local()[rows]
        return F.linear(x, lin.weight.to_local()[rows], bias)

    def _attention(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        a = block.attn
        kv_heads = a.wk.weight.shape[0] // a.head_dim  # the full (global) shape: all kv heads
        q = F.linear(x, a.wq.weight.to_local(), local(a.wq.bias))
        k, v = (self._kv(x, lin, a.head_dim, kv_heads) for lin in (a.wk, a.wv))
        return self.row_parallel(attend(q, k, v, a.head_dim, a.rope), a.wo)

    def _mlp(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        m = block.mlp
        h = F.silu(F.linear(x, m.gate.weight.to_local())) * F.linear(x, m.up.weight.to_local())
        return self.row_parallel(h, m.down)

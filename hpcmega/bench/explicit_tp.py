"""Explicit (hand-written, Megatron-style) tensor parallelism of hpcmega's GPT: the reference row of `hpcmega bench`.

Plain tensors, no DTensor: each rank keeps slices of the same initialised weights (``hpcmega.models.gpt2.model``), the
attention projections q/k/v and fc1 split by output features (column-parallel), wo and fc2 by input features
(row-parallel). Two autograd functions carry all the communication (Shoeybi et al. 2019): ``f`` (identity forward,
all-reduce of the gradient backward) before a column-parallel pair and ``g`` (all-reduce forward, identity
backward) after the row-parallel matmul -- one all-reduce per sub-layer each way. No sequence parallelism;
embeddings and LayerNorms are replicated (their gradients come out identical on every rank, nothing to sync); the
bias-free head is column-parallel over the vocabulary and its logits are all-gathered for the loss.

It exists to measure what a framework adds over the hand-written approach on the same model and weights; it is
checked equal to the single-process model in tests/test_explicit_tp.py and not used for training.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hpcmega.models.common import cross_entropy
from hpcmega.models.gpt2.model import GPT


class _CopyToTP(torch.autograd.Function):
    """``f``: the input enters a column-parallel region whole; the gradient leaving it is summed over tp."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """``g``: partial sums of a row-parallel matmul are summed over tp; the gradient passes through."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Vocab-sharded logits -> whole logits; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.width = group, dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


class ExplicitTPBlock(nn.Module):
    def __init__(self, block: nn.Module, prefix: str, shards: "ShardMap") -> None:
        super().__init__()
        self.group, self.head_dim = shards.group, block.attn.head_dim
        self.ln1, self.ln2 = block.ln1, block.ln2
        a, m = block.attn, block.mlp
        for name, lin, path in (("wq", a.wq, "attn.wq"), ("wk", a.wk, "attn.wk"), ("wv", a.wv, "attn.wv"),
                                ("fc1", m.fc1, "mlp.fc1")):  # column-parallel
            setattr(self, f"{name}_w", shards.slice(f"{prefix}.{path}.weight", lin.weight, 0))
            setattr(self, f"{name}_b", shards.slice(f"{prefix}.{path}.bias", lin.bias, 0))
        for name, lin, path in (("wo", a.wo, "attn.wo"), ("fc2", m.fc2, "mlp.fc2")):  # row-parallel
            setattr(self, f"{name}_w", shards.slice(f"{prefix}.{path}.weight", lin.weight, 1))
            setattr(self, f"{name}_b", shards.slice(f"{prefix}.{path}.bias", lin.bias, None))  # added after the sum

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        x = _CopyToTP.apply(x, self.group)
        q, k, v = (F.linear(x, getattr(self, f"{n}_w"), getattr(self, f"{n}_b")).view(b, s, -1, self.head_dim)
                   .transpose(1, 2) for n in ("wq", "wk", "wv"))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        return _ReduceFromTP.apply(F.linear(y, self.wo_w), self.group) + self.wo_b

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        x = _CopyToTP.apply(x, self.group)
        h = F.gelu(F.linear(x, self.fc1_w, self.fc1_b), approximate="tanh")
        return _ReduceFromTP.apply(F.linear(h, self.fc2_w), self.group) + self.fc2_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attn(self.ln1(x))
        return x + self._mlp(self.ln2(x))


class ShardMap:
    """Which full-model parameter each explicit-TP parameter comes from, and along which dim it is split (None:
    a replicated copy)."""

    def __init__(self, group) -> None:
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)
        self.sources: dict[str, tuple[nn.Parameter, int | None]] = {}

    def slice(self, name: str, full: torch.Tensor, dim: int | None) -> nn.Parameter:
        value = full.detach() if dim is None else full.detach().chunk(self.size, dim=dim)[self.rank]
        param = nn.Parameter(value.clone())
        self.sources[name] = (param, dim)
        return param


class ExplicitTPGPT(nn.Module):
    """The shards of ``model`` (a full, initialised hpcmega GPT) this rank of ``group`` holds."""

    def __init__(self, model: GPT, group) -> None:
        super().__init__()
        self.shards = ShardMap(group)
        self.group = group
        self.tok_emb, self.pos_emb, self.ln_f = model.tok_emb, model.pos_emb, model.ln_f
        self.blocks = nn.ModuleList(ExplicitTPBlock(b, f"blocks.{i}", self.shards) for i, b in model.blocks.items())
        self.head_w = self.shards.slice("head.weight", model.head.weight, 0)
        for prefix, module in (("tok_emb", self.tok_emb), ("pos_emb", self.pos_emb), ("ln_f", self.ln_f),
                               *((f"blocks.{i}.{ln}", getattr(b, ln)) for i, b in model.blocks.items()
                                 for ln in ("ln1", "ln2"))):
            for pname, p in module.named_parameters():
                self.shards.sources[f"{prefix}.{pname}"] = (p, None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        x = _CopyToTP.apply(self.ln_f(x), self.group)
        return _GatherLastDim.apply(F.linear(x, self.head_w), self.group)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self(idx), targets)

    def sharded_parameters(self) -> list[nn.Parameter]:
        """The slices (every other parameter is replicated, identical on every rank)."""
        return [p for p, dim in self.shards.sources.values() if dim is not None]


@torch.no_grad()
def clip_grad_norm_explicit(model: ExplicitTPGPT, max_norm: float) -> torch.Tensor:
    """Global grad norm in one all-reduce: slices add their squares, replicated copies a 1/tp share each."""
    sharded = {id(p) for p in model.sharded_parameters()}
    squared = torch.zeros(())
    for p in model.parameters():
        if p.grad is not None:
            share = 1.0 if id(p) in sharded else 1.0 / model.shards.size
            squared += p.grad.float().square().sum() * share
    dist.all_reduce(squared, group=model.group)
    norm = squared.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
    return norm

"""GPT-2 style decoder whose parameter names do not depend on how it is split or sharded.

Why the shape of this module matters for parallelism:
- Blocks live in an ``nn.ModuleDict`` keyed by their *global* index. A pipeline stage deletes the blocks it does
  not own (and sets the embeddings / final norm / head to ``None``), so every parameter keeps the name it has in the
  full model and sharded checkpoints can be loaded into any other layout.
- Attention has separate ``wq``/``wk``/``wv`` projections: a fused qkv Linear split column-wise by tensor
  parallelism would hand each rank a mix of q, k and v columns.
- ``forward`` accepts token ids (the stage holding the embeddings) or hidden states (every later stage).
- Initialisation draws each parameter from its own generator seeded by (seed, parameter name), so any stage on any
  rank produces exactly the values the single-process model has, without building the full model. It also works
  after sharding: for a DTensor parameter only this rank's local shard is written (the full value of one parameter
  is drawn, sliced and dropped before the next), so the engine can build on the meta device, shard, allocate only
  the shards with ``to_empty`` and then initialise.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcmega.config import ModelConfig
from hpcmega.models.common import PreNormBlock, init_weights, keep_stage


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.head_dim = d_model // n_heads
        self.wq = nn.Linear(d_model, d_model)
        self.wk = nn.Linear(d_model, d_model)
        self.wv = nn.Linear(d_model, d_model)
        self.wo = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(PreNormBlock):
    """Pre-LayerNorm transformer block (the engine's hooks: :class:`hpcmega.models.common.PreNormBlock`)."""

    def __init__(self, d_model: int, n_heads: int, eps: float = 1e-5) -> None:
        super().__init__(nn.LayerNorm(d_model, eps=eps), Attention(d_model, n_heads), nn.LayerNorm(d_model, eps=eps),
                         MLP(d_model))


class GPT(nn.Module):
    """The full model, or one pipeline stage of it after :meth:`keep_only`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb: nn.Embedding | None = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleDict({str(i): Block(cfg.d_model, cfg.n_heads, cfg.norm_eps)
                                     for i in range(cfg.n_layers)})
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    # -- pipeline split ---------------------------------------------------------------------------------------------
    def keep_only(self, layers: range, first: bool, last: bool) -> GPT:
        """Turn this model into one pipeline stage: keep ``layers`` (global indices), embeddings iff ``first``,
        final norm and head iff ``last``. Names of what is kept do not change."""
        return keep_stage(self, layers, first, last)

    # -- initialisation ---------------------------------------------------------------------------------------------
    def init_weights(self, seed: int) -> None:
        """GPT-2 initialisation, each tensor from a generator seeded by (seed, its name): layout-independent.
        Residual-stream projections are scaled down by depth."""
        init_weights(self, seed, self.cfg.n_layers, residual=("attn.wo", "mlp.fc2"))

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] on the first stage, hidden states [b, s, d] elsewhere; logits [b, s, vocab] on the last."""
        if self.tok_emb is not None:
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            x = self.tok_emb(x) + self.pos_emb(positions)
        for block in self.blocks.values():
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.head is not None:
            x = self.head(x)
        return x


Model = GPT  # what hpcmega.models.common.new_model builds for family gpt2

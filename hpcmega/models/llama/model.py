"""Llama-family decoder (Llama 2/3, Mistral, Qwen2-style with ``qkv_bias``): RoPE, RMSNorm, SwiGLU MLP,
grouped-query attention, no biases, untied or tied embeddings; split and sharded by the engine exactly like GPT-2.

It keeps GPT-2's contract with the engine (hpcmega.models.gpt2): blocks in an ``nn.ModuleDict`` keyed by their
*global* index, so ``keep_only`` (a pipeline stage) never renames a parameter and every checkpoint reshards; a
block runs ``checkpoint_fn`` (activation recompute) or ``sharded_body`` (tensor parallelism) when the engine sets
them; initialisation draws each parameter from a generator seeded by (seed, name), so any stage on any rank, sharded
or not, holds exactly the single-process values.

Parameter names and their Hugging Face ``LlamaForCausalLM`` names (a rename, no reshaping: RoPE rotates the two
halves of each head, the ``rotate_half`` convention of HF checkpoints, so q/k need no permutation)::

    tok_emb.weight                      model.embed_tokens.weight
    blocks.{i}.ln1.weight               model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.wq.weight (.bias)   model.layers.{i}.self_attn.q_proj.weight (.bias with qkv_bias)
    blocks.{i}.attn.wk.weight (.bias)   model.layers.{i}.self_attn.k_proj.weight
    blocks.{i}.attn.wv.weight (.bias)   model.layers.{i}.self_attn.v_proj.weight
    blocks.{i}.attn.wo.weight           model.layers.{i}.self_attn.o_proj.weight
    blocks.{i}.ln2.weight               model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.gate.weight          model.layers.{i}.mlp.gate_proj.weight
    blocks.{i}.mlp.up.weight            model.layers.{i}.mlp.up_proj.weight
    blocks.{i}.mlp.down.weight          model.layers.{i}.mlp.down_proj.weight
    ln_f.weight                         model.norm.weight
    head.weight                         lm_head.weight (absent with tie_embeddings: the head is tok_emb.weight)

Shapes are HF's: wq [n_heads*head_dim, d], wk/wv [n_kv_heads*head_dim, d], wo [d, n_heads*head_dim],
gate/up [ffn_hidden, d], down [d, ffn_hidden]. RoPE scaling: Llama 3.1's long-context rule (HF ``rope_type``
"llama3"); not supported: other scaling rules (YaRN, dynamic NTK, ...), sliding-window attention.

The RoPE tables are computed in each attention call from the sequence length (nothing cached): no buffer to
initialise after ``to_empty``, and selective recompute recomputes them instead of keeping them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcmega.config import ModelConfig
from hpcmega.models.common import PreNormBlock, RMSNorm, init_weights, keep_stage


@dataclass(frozen=True)
class Rope:
    """RoPE's settings (ModelConfig's rope_* fields): base frequency and Llama 3.1's long-context scaling."""

    theta: float
    scaling: float  # 0: none
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Rope":
        return cls(cfg.rope_theta, cfg.rope_scaling, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                   cfg.rope_original_max_seq_len)

    def inv_freq(self, head_dim: int, device: torch.device) -> torch.Tensor:
        """theta^(-2i/hd) per pair i; with scaling (HF rope_type 'llama3'), frequencies whose wavelength exceeds
        original_max_seq_len / low_freq_factor are divided by the factor, those shorter than original_max_seq_len
        / high_freq_factor kept, and the band between interpolated smoothly in 1/wavelength."""
        inv = 1.0 / self.theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
        if not self.scaling:
            return inv
        wavelen = 2 * math.pi / inv
        smooth = ((self.original_max_seq_len / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor)).clamp(0, 1)
        return (1 - smooth) * inv / self.scaling + smooth * inv


def rope_tables(seq_len: int, head_dim: int, rope: Rope, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin [seq_len, head_dim] in fp32: position p rotates pair (i, i + head_dim/2) by p * inv_freq[i]."""
    inv_freq = rope.inv_freq(head_dim, device)
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [b, heads, s, head_dim] by position (rotate_half convention); heads are independent, so under tensor
    parallelism each rank rotates its local heads."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, rope: Rope) -> torch.Tensor:
    """Causal attention of projected q [b, s, hq*hd] and k, v [b, s, hkv*hd] -> [b, s, hq*hd], RoPE on q and k.
    Each kv head serves hq/hkv consecutive query heads (HF's repeat_kv): under tensor parallelism the local q and kv
    heads are such groups too, so the same code runs on every rank's shard."""
    b, s, _ = q.shape
    q, k, v = (t.view(b, s, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = rope_tables(s, head_dim, rope, q.device)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # explicit repeat: SDPA's own enable_gqa falls back to the unfused math kernel on CPU
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b, s, -1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"n_heads {cfg.n_heads} must divide d_model {cfg.d_model} and be a multiple of "
                             f"n_kv_heads {cfg.kv_heads}")
        hd = self.head_dim = cfg.head_dim
        self.rope = Rope.of(cfg)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(attend(self.wq(x), self.wk(x), self.wv(x), self.head_dim, self.rope))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(PreNormBlock):
    """Pre-RMSNorm block (the engine's hooks: :class:`hpcmega.models.common.PreNormBlock`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg), RMSNorm(cfg.d_model, cfg.norm_eps),
                         MLP(cfg.d_model, cfg.ffn))


class Llama(nn.Module):
    """The full model, or one pipeline stage of it after :meth:`keep_only`.

    With ``tie_embeddings`` there is no head module: the logits are ``x @ tok_emb.weight.T`` (``tied_logits``, which
    tensor parallelism replaces by its vocab-parallel version), so the one weight has one name, the embedding's."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.ln_f: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head: nn.Linear | None = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                                 bias=False)
        self.tied_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear

    def keep_only(self, layers: range, first: bool, last: bool) -> Llama:
        """One pipeline stage: ``layers`` (global indices), the embedding iff ``first``, final norm and head iff
        ``last`` (with tied embeddings validation keeps both on one stage). Kept names do not change."""
        return keep_stage(self, layers, first, last)

    def init_weights(self, seed: int) -> None:
        """Normal(0.02) matrices, residual projections (wo, down) scaled by 1/sqrt(2 n_layers), norms 1, biases 0;
        each tensor from a generator seeded by (seed, its name): layout-independent."""
        init_weights(self, seed, self.cfg.n_layers, residual=("attn.wo", "mlp.down"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [b, s] on the first stage, hidden states [b, s, d] elsewhere; logits [b, s, vocab] on the last."""
        if self.tok_emb is not None:
            x = self.tok_emb(x)
        for block in self.blocks.values():
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
            x = self.head(x) if self.head is not None else self.tied_logits(x, self.tok_emb.weight)
        return x


Model = Llama  # what hpcmega.models.common.new_model builds for family llama

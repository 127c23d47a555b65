"""What the planner needs to know about each model family's block (hpcmega.models), as plain numbers (no torch).

One place per fact: parameters per tensor-parallel rank, the matmul parameters the FLOPs count, what selective
recompute keeps, and which replicated parameters get ``Partial`` gradients under tensor parallelism. The estimator
(:mod:`hpcmega.planning.estimate`) composes them into memory, FLOPs and traffic; the engine's block code is what each
number describes (``plan --measure`` and tests/test_recompute.py check them against it).

GPT-2 (hpcmega.models.gpt2): learned positions, LayerNorm (weight and bias), q/k/v/o and a 4h GELU MLP, all with
biases. Llama (hpcmega.models.llama): RMSNorm (weight only), q and o [h, h], k and v [h, kv_dim] with
kv_dim = n_kv_heads x head_dim (grouped-query attention), SwiGLU gate/up/down with width f, biases only on q/k/v
with ``qkv_bias``; no position table; the head may be the embedding's weight (tied).
"""
from __future__ import annotations

from dataclasses import dataclass

from hpcmega.config import ModelConfig


def kv_heads_replicated(family: str, kv_heads: int, tp: int) -> bool:
    """llama with tp > n_kv_heads: each TP rank computes the one kv head its query heads share, from k/v weights
    replicated over tp, instead of owning n_kv_heads / tp of them (hpcmega.models.llama.parallelize)."""
    return family == "llama" and tp > kv_heads


@dataclass(frozen=True)
class BlockShape:
    family: str
    h: int
    heads: int
    kv_heads: int
    ffn: int
    qkv_bias: bool = False
    tied: bool = False

    @classmethod
    def of(cls, m: ModelConfig) -> BlockShape:
        return cls(m.family, m.d_model, m.n_heads, m.kv_heads, m.ffn, m.qkv_bias, m.tie_embeddings)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.h // self.heads)

    @property
    def head_dim(self) -> int:
        return self.h // self.heads

    def kv_replicated(self, tp: int) -> bool:
        return kv_heads_replicated(self.family, self.kv_heads, tp)

    def params(self, tp: int) -> int:
        """One block's parameters on one TP rank (tp = 1: the whole block)."""
        h = self.h
        if self.family == "gpt2":  # wq/wk/wv/fc1 (weights, biases) and wo/fc2 weights split; 2 biases, 2 LNs not
            return (12 * h * h + 7 * h) // tp + 6 * h
        kv = 2 * (h * self.kv_dim + (self.kv_dim if self.qkv_bias else 0))  # wk, wv
        split = 2 * h * h + 3 * h * self.ffn + (h if self.qkv_bias else 0)  # wq (+bias), wo, gate, up, down
        if self.kv_replicated(tp):
            return split // tp + kv + 2 * h
        return (split + kv) // tp + 2 * h  # + the two RMSNorm weights

    def matmul_params(self) -> int:
        """Weights one token multiplies per block (model FLOPs: 6 x this per token, forward and backward)."""
        h = self.h
        if self.family == "gpt2":
            return 12 * h * h
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.ffn

    def embedding_params(self, vocab: int, max_seq_len: int, tp: int) -> int:
        """Token embedding (and GPT-2's position table), vocab- and position-parallel over tp."""
        return (vocab + (max_seq_len if self.family == "gpt2" else 0)) * self.h // tp

    def head_params(self, vocab: int, tp: int) -> int:
        """Final norm (replicated) and the bias-free head (column-parallel; none of its own when tied)."""
        norm = 2 * self.h if self.family == "gpt2" else self.h
        return norm + (0 if self.tied else vocab * self.h // tp)

    def selective_units(self, sp: bool, tp: int) -> tuple[float, float]:
        """Tensors a block keeps for backward with selective recompute, in s*b*h elements: (replicated over tp,
        split over tp). It keeps its input and the results of the matmuls, attention and TP reductions
        (hpcmega.parallel.recompute): GPT-2 q, k, v, attention output, the 4h fc1 output; llama q, k, v
        (kv_dim each), attention output, gate and up (f each); both the wo and MLP-output results at tp = 1 or
        the two reduction outputs with tp > 1. With SP the input and the reductions are sequence shards; without
        SP they are replicated. Replicated kv heads: head_dim-wide k and v on every rank."""
        h = self.h
        if self.family == "gpt2":
            inside = 8.0
        else:
            inside = 2 + 2 * self.ffn / h + (0 if self.kv_replicated(tp) else 2 * self.kv_dim / h)
        replicated = 2 * self.head_dim / h if self.kv_replicated(tp) else 0.0
        if sp:
            return replicated, inside + 3
        return replicated + 3, inside

    def llama_none_bytes(self, s: int, b: int, tp: int, sp: bool, e: int) -> float:
        """Bytes one llama block keeps for backward without recompute, per microbatch on one TP rank (``e`` bytes
        per activation element; measured per t in tests/test_recompute.py). Per token: the block input; per
        RMSNorm its fp32 upcast (the block input's own storage in fp32), the normalised value and its output
        (with SP the all-gathered full sequence, which the matmuls keep); SDPA's q, the repeated k, v and its
        output (the query-head width h/t each: repeated kv heads cost as much as query heads); the MLP's gate, up,
        silu(gate) and their product (f/t each). Plus the fp32 log-sum-exp per head, the RoPE cos/sin tables cast
        for q and k (s x head_dim) and the norms' fp32 rsqrt per token."""
        sbh = s * b * self.h
        r = tp if sp else 1  # the residual stream's split
        fp32_copies = 2 if e != 4 else 1  # in fp32 the first norm's upcast is the block input itself
        residual = e + 2 * e + 4 * fp32_copies  # input, two normalised values, the fp32 upcasts
        split = 4 * e + 4 * self.ffn / self.h * e  # q, k, v, attention output; gate, up, silu, product
        gathered = 2 * e  # the two norm outputs the column-parallel matmuls read (full sequence)
        tables = 4 if e != 4 else 2  # cos and sin cast for q and for k (in fp32 the casts are the fp32 tables)
        small = 4 * s * b * (self.heads // tp) + tables * s * self.head_dim * e + 2 * 4 * s * b // r
        return sbh * (residual / r + split / tp + gathered) + small

    def partial_grad_elements(self, sp: bool, tp: int) -> int:
        """Elements per block whose gradients are ``Partial`` over tp and all-reduced once per step in fp32: with SP
        the replicated parameters applied to sequence shards (GPT-2: 2 LayerNorms and the wo/fc2 biases, 6h;
        llama: 2 RMSNorms, 2h); llama's replicated k/v weights (each rank's gradient covers its kv head's rows)."""
        if tp == 1:
            return 0
        norms = (6 if self.family == "gpt2" else 2) * self.h if sp else 0
        if not self.kv_replicated(tp):
            return norms
        return norms + 2 * (self.h * self.kv_dim + (self.kv_dim if self.qkv_bias else 0))

    def final_norm_partial_elements(self, sp: bool, tp: int) -> int:
        if tp == 1 or not sp:
            return 0
        return 2 * self.h if self.family == "gpt2" else self.h

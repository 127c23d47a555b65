"""Per-rank memory, FLOPs, bubble, communication and step time of one layout, from arithmetic alone (no torch).

The numbers model *the engine hpcmega runs* (hpcmega.parallel), not a generic transformer, and every term is checked
against a measurement of the real code on a fake process group (``hpcmega plan --measure``,
tests/test_planning_measure.py). docs/planning.md explains each term with a worked 7B example.

Units: elements are counted per tensor-parallel rank; bytes per GPU. ``sbh`` = sequence x micro-batch x hidden.

Model state (AdamW, hpcmega.training.optim): parameters live in fp32 (with bf16 they are FSDP2's fp32 master copy), one fp32
gradient per parameter and two fp32 moments. FSDP2 (used whenever dp > 1 or precision is bf16) shards all of it over
"dp" and all-gathers parameters in the compute dtype for forward and backward. Where the engine keeps unsharded
copies: inside a pipeline (pp > 1) the schedule turns resharding after backward and gradient sync off until the last
microbatch, so a rank holds its stage's gathered parameters and fp32 unsharded gradient accumulators for the whole
step; with pp = 1 and several microbatches the gradients are reduce-scattered after every microbatch into their
shards (``reduce_every_microbatch``, the ZeRO-3 default: m reduce-scatters per step) or, without it, accumulate
unsharded until the last (one reduce-scatter, an fp32 accumulator for the whole rank); without
``reshard_after_forward`` the gathered parameters stay until the last backward (one all-gather per step).

``parallel.data_parallel = "replicate"`` (plain DDP, tp = pp = 1): every rank holds the full fp32 parameters,
gradients and both moments, plus DDP's gradient buckets (one more fp32 copy at the backward peak, measured with
``plan --measure``); with bf16, autocast's bf16 copies of the weights live from forward to backward. Its only dp
traffic is one fp32 gradient all-reduce per step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from hpcmega.config import Config
from hpcmega.planning.stages import layers_for_stage, stage_ids_for_rank
from hpcmega.planning.flops import model_flops_per_step
from hpcmega.gpus import GPU, INTERNODE_GB_S, get_gpu
from hpcmega.planning.families import BlockShape
from hpcmega.planning.schedule_facts import bubble_fraction, chunks_in_flight

GIB = 2**30
FP32 = 4


@dataclass(frozen=True)
class Shape:
    """Everything the estimator reads: the model, the layout and the batch, as plain numbers."""

    vocab: int
    h: int
    layers: int
    heads: int
    max_seq_len: int
    tp: int
    pp: int
    dp: int
    v: int  # stages per pipeline rank
    schedule: str
    m: int  # microbatches per step per DP rank
    b: int  # sequences per microbatch
    s: int
    recompute: str
    sp: bool
    precision: str
    reshard_after_forward: bool
    replicate: bool = False  # parallel.data_parallel = "replicate"
    reduce_every_microbatch: bool = False  # Config.reduce_every_microbatch (pp = 1 FSDP2 accumulation)
    family: str = "gpt2"  # the block's architecture and its extra shape (hpcmega.planning.families)
    kv_heads: int = 0  # 0 = heads
    ffn: int = 0  # 0 = 4h
    qkv_bias: bool = False
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> "Shape":
        m = cfg.microbatches
        return cls(
            vocab=cfg.model.vocab_size, h=cfg.model.d_model, layers=cfg.model.n_layers, heads=cfg.model.n_heads,
            max_seq_len=cfg.model.max_seq_len, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.dp,
            v=cfg.stages_per_rank if cfg.parallel.pp > 1 else 1, schedule=cfg.parallel.schedule, m=m,
            b=max(1, cfg.train.global_batch // max(1, cfg.dp * m)), s=cfg.train.seq_len,
            recompute=cfg.parallel.recompute, sp=cfg.sequence_parallel, precision=cfg.train.precision,
            reshard_after_forward=cfg.reshard_after_forward, replicate=cfg.parallel.data_parallel == "replicate",
            reduce_every_microbatch=cfg.reduce_every_microbatch,
            family=cfg.model.family, kv_heads=cfg.model.kv_heads, ffn=cfg.model.ffn, qkv_bias=cfg.model.qkv_bias,
            tied=cfg.model.tie_embeddings,
        )

    @property
    def block(self) -> BlockShape:
        return BlockShape(self.family, self.h, self.heads, self.kv_heads or self.heads, self.ffn or 4 * self.h,
                          self.qkv_bias, self.tied)

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of activations and gathered parameters."""
        return 2 if self.precision == "bf16" else 4

    @property
    def fsdp(self) -> bool:
        """The engine wraps in FSDP2 whenever dp > 1, and for bf16 (it carries the mixed-precision policy), unless
        data_parallel is replicate."""
        return not self.replicate and (self.dp > 1 or self.precision == "bf16")

    @property
    def ddp(self) -> bool:
        """data_parallel = replicate with dp > 1: plain DDP."""
        return self.replicate and self.dp > 1

    @property
    def tokens_per_microbatch(self) -> int:
        return self.b * self.s


# -- parameters ---------------------------------------------------------------------------------------------------
def block_params(sh: Shape) -> int:
    """One block's parameters on one TP rank (GPT-2: 12h^2 + 13h at tp = 1; hpcmega.planning.families)."""
    return sh.block.params(sh.tp)


def embedding_params(sh: Shape) -> int:
    """Token (and GPT-2's position) embeddings, vocab- and position-parallel over tp."""
    return sh.block.embedding_params(sh.vocab, sh.max_seq_len, sh.tp)


def head_params(sh: Shape) -> int:
    """Final norm (replicated) and the bias-free head (column-parallel over the vocabulary; none when tied)."""
    return sh.block.head_params(sh.vocab, sh.tp)


def total_params(sh: Shape) -> int:
    """The whole model's parameter count (tp = 1 numbers)."""
    block = sh.block
    return sh.layers * block.params(1) + block.embedding_params(sh.vocab, sh.max_seq_len, 1) + block.head_params(
        sh.vocab, 1)


# -- activations --------------------------------------------------------------------------------------------------
def korthikanti_bytes_per_layer(s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: str,
                                dropout: bool = True, flash: bool = False, sp_keeps_gathered: bool = False) -> float:
    """Activation bytes one transformer layer keeps, 16-bit activations, from the breakdown of Korthikanti et al.
    (2022) section 4.1 -- with the defaults exactly their Table 2:

      attention 11sbh + 5as^2b: QKV input 2sbh, Q and K 4sbh, V 2sbh, softmax output 2as^2b, its dropout mask
      as^2b and output 2as^2b, projection input 2sbh, output dropout mask sbh; MLP 19sbh: fc1 input 2sbh, GELU
      input 8sbh, fc2 input 8sbh, dropout mask sbh; two LayerNorm inputs 4sbh. TP splits what lies between the
      column- and row-parallel matmuls; SP also splits the rest. Selective recompute drops the s^2 terms; full
      recompute keeps the layer input (2sbh).

    The flags describe an engine that differs: no ``dropout`` (no masks), ``flash`` attention (no s x s matrices,
    only a fp32 log-sum-exp per head and token), and ``sp_keeps_gathered`` (DTensor SP: the column-parallel matmuls
    keep their all-gathered, full-sequence inputs instead of the sequence shard Megatron keeps and re-gathers).
    """
    sbh = s * b * h
    if recompute == "full":
        return 2.0 * sbh
    outside = 4 + (2 if dropout else 0)  # LayerNorm inputs, dropout masks: split only by SP
    gathered = 4.0  # QKV and fc1 inputs
    inside = 4 + 2 + 2 + 8 + 8  # Q,K / V / projection input / GELU input / fc2 input: split by TP
    total = inside * sbh / t
    total += outside * sbh / (t if sp else 1)
    total += gathered * sbh / (t if sp and not sp_keeps_gathered else 1)
    if flash:
        total += 4 * s * b * (a // t)  # fp32 log-sum-exp
    elif recompute != "selective":
        total += (5 if dropout else 2) * a * s * s * b / t
    return total


def activation_bytes_per_layer(sh: Shape, recompute: str | None = None) -> int:
    """Bytes one block keeps for backward, per microbatch, on one TP rank."""
    mode = recompute or sh.recompute
    sp = sh.sp and sh.tp > 1
    if mode == "none" and sh.family == "llama":
        return int(sh.block.llama_none_bytes(sh.s, sh.b, sh.tp, sp, sh.compute_bytes))
    if mode == "none":  # SDPA (flash) attention, no dropout, DTensor sequence parallelism
        bytes16 = korthikanti_bytes_per_layer(sh.s, sh.b, sh.h, sh.heads, sh.tp, sp, "none", dropout=False,
                                              flash=True, sp_keeps_gathered=True)
        lse = 4 * sh.tokens_per_microbatch * (sh.heads // sh.tp)
        return int((bytes16 - lse) * sh.compute_bytes / 2) + lse
    if mode == "full":  # the block input only
        full, split = (0.0, 1.0) if sp else (1.0, 0.0)
    else:
        full, split = sh.block.selective_units(sp, sh.tp)
    sbh = sh.tokens_per_microbatch * sh.h
    logsumexp = 0 if mode == "full" else FP32 * sh.tokens_per_microbatch * (sh.heads // sh.tp)
    return int((full + split / sh.tp) * sbh * sh.compute_bytes) + logsumexp


def recompute_transient_bytes(sh: Shape) -> int:
    """During backward a recomputed block briefly holds what recompute saved it from keeping."""
    if sh.recompute == "none":
        return 0
    return max(0, activation_bytes_per_layer(sh, "none") - activation_bytes_per_layer(sh))


def head_activation_bytes(sh: Shape) -> int:
    """Last stage, per microbatch in flight: final-norm input and gathered output, fp32 log-softmax of the
    vocab-parallel logits and, inside a pipeline, the logits the stage returns (kept until backward)."""
    sbh = sh.tokens_per_microbatch * sh.h
    norm_in = sbh // sh.tp if sh.sp and sh.tp > 1 else sbh
    logits = sh.tokens_per_microbatch * sh.vocab // sh.tp
    kept_output = sh.compute_bytes if sh.pp > 1 else 0
    return (norm_in + sbh) * sh.compute_bytes + logits * (FP32 + kept_output)


def boundary_bytes(sh: Shape) -> int:
    """One microbatch's activations between two pipeline stages (sequence-sharded with SP)."""
    return sh.tokens_per_microbatch * sh.h * sh.compute_bytes // (sh.tp if sh.sp and sh.tp > 1 else 1)


def receive_buffer_bytes(sh: Shape, stages: list[int]) -> int:
    """What ``torch.distributed.pipelining`` keeps for the whole run on a rank owning ``stages``: each
    ``PipelineStage`` allocates, when the schedule first runs, one activation receive buffer per microbatch (every
    stage but the first) and one gradient receive buffer per microbatch (every stage but the last), each one
    boundary tensor -- also between two stages of the same rank (torch 2.13, ``_setup_forward_recv_info``)."""
    if sh.pp == 1:
        return 0
    last = sh.pp * sh.v - 1
    return sum((st > 0) + (st < last) for st in stages) * sh.m * boundary_bytes(sh)


def token_id_bytes(sh: Shape, first: bool, last: bool) -> int:
    """The step's int64 token ids on the device: inputs on the first stage, targets on the last."""
    return (first + last) * sh.m * sh.tokens_per_microbatch * 8


def logits_grad_bytes(sh: Shape) -> int:
    """Transient during the last stage's backward: fp32 gradient of the logits (and its compute-dtype cast). With
    tp > 1 torch's vocab-parallel loss (``loss_parallel``) computes it as (one-hot + exp(log-probabilities)) x
    grad, three fp32 logits-sized tensors at once (torch 2.13; measured at gpt2-124m's vocabulary by
    ``plan --measure``)."""
    logits = sh.tokens_per_microbatch * sh.vocab // sh.tp
    if sh.tp > 1:
        return 3 * FP32 * logits
    return logits * (FP32 + (sh.compute_bytes if sh.compute_bytes != FP32 else 0))


# -- one pipeline rank ----------------------------------------------------------------------------------------------
@dataclass
class RankMemory:
    stage: int  # pipeline rank
    params: int
    grads: int
    optimizer: int
    activations: int
    buffers: int  # pipeline receive buffers, token ids, FSDP2 unsharded parameters / gradient accumulators,
    # recompute and logits transients
    peak: int
    param_count: int
    layers: int

    def to_json(self) -> dict[str, Any]:
        return stage_json(self)


def stage_json(r: Any) -> dict[str, Any]:
    """One entry of `memory.stages` in `plan --json` (estimated or measured: anything with these byte fields)."""
    return {"stage": r.stage, **{f"{k}_gib": gib(getattr(r, k))
                                 for k in ("params", "grads", "optimizer", "activations", "peak")}}


def gib(n: float) -> float:
    return round(n / GIB, 6)


def rank_memory(sh: Shape, pp_rank: int) -> RankMemory:
    num_stages = sh.pp * sh.v
    stages = stage_ids_for_rank(pp_rank, sh.pp, sh.v, sh.schedule)
    layer_ranges = [layers_for_stage(st, num_stages, sh.layers) for st in stages]
    n_layers = sum(len(r) for r in layer_ranges)
    first, last = 0 in stages, num_stages - 1 in stages
    count = n_layers * block_params(sh) + (embedding_params(sh) if first else 0)
    count += head_params(sh) if last else 0

    shard = sh.dp if sh.fsdp else 1
    params = FP32 * count // shard
    grads = FP32 * count // shard
    optimizer = 2 * FP32 * count // shard

    in_flight = chunks_in_flight(sh.schedule, sh.pp, pp_rank, len(stages), sh.m)
    activations = in_flight * (n_layers / len(stages)) * activation_bytes_per_layer(sh)
    head_in_flight = 0
    if last:  # the last local stage's forwards come after (v - 1) rounds of the others'
        rounds = sh.pp if sh.m % sh.pp == 0 else sh.m
        head_in_flight = max(1, in_flight - (len(stages) - 1) * rounds)
        activations += head_in_flight * head_activation_bytes(sh)
    if sh.pp > 1:  # every other stage's output is kept by the pipeline until its backward
        activations += (in_flight - head_in_flight) * boundary_bytes(sh)
    activations = int(activations)

    accumulating = sh.pp > 1 or sh.m > 1  # gradients outlive one backward
    held = receive_buffer_bytes(sh, stages) + token_id_bytes(sh, first, last)  # alive for the whole step
    buffers = held + recompute_transient_bytes(sh) + (logits_grad_bytes(sh) if last else 0)
    grads_at_peak = grads
    if sh.fsdp:
        # Sharded gradients appear with the first reduce-scatter: after the last backward (activations gone), or
        # after the first microbatch's when every microbatch reduces.
        per_microbatch = accumulating and sh.reduce_every_microbatch
        grads_at_peak = grads if per_microbatch else 0
        block = block_params(sh)
        if sh.pp > 1 or not sh.reshard_after_forward:
            buffers += sh.compute_bytes * count  # gathered parameters kept until the end of backward
        else:
            buffers += sh.compute_bytes * (count - n_layers * block + 2 * block)  # root + two blocks in flight
        buffers += FP32 * (count if accumulating and not per_microbatch else 2 * block)  # unsharded gradients
        if first and sh.pp > 1 and sh.compute_bytes != FP32:
            # The first stage's peak is the end of its backward, when the embeddings' compute-dtype gradients
            # arrive next to their fp32 accumulators (measured: one bf16 copy of the embedding shard).
            buffers += sh.compute_bytes * embedding_params(sh)
    elif sh.replicate and sh.precision == "bf16":
        buffers += sh.compute_bytes * count  # autocast's bf16 copies of the weights, kept for backward
    if sh.ddp:  # DDP's gradient buckets next to the gradients autograd produces (plan --measure: one fp32 copy)
        buffers += FP32 * count
    if accumulating or sh.fsdp or sh.ddp:  # DDP's gradient buckets exist before backward starts
        backward_peak = params + optimizer + grads_at_peak + activations + buffers
    else:
        # One microbatch, plain gradients: backward frees a layer's activations as it fills its gradients.
        backward_peak = params + optimizer + max(activations, grads) + buffers
    # AdamW (foreach, one optimizer per local stage) holds a temporary the size of that stage's parameters (the
    # square root of the second moment) during its step.
    largest_stage = max(len(r) for r in layer_ranges) * block_params(sh) + (count - n_layers * block_params(sh))
    optimizer_peak = params + grads + optimizer + FP32 * min(count, largest_stage) // shard + held
    peak = max(backward_peak, optimizer_peak)
    return RankMemory(pp_rank, params, grads, optimizer, activations, buffers, peak, count, n_layers)


# -- throughput ---------------------------------------------------------------------------------------------------
def flops_per_step(sh: Shape) -> float:
    """Model FLOPs of one optimizer step (hpcmega.planning.flops): 6N + 12*L*h*s per token, N = the matmul weights
    (GPT-2: 12*L*h^2 + V*h)."""
    return model_flops_per_step(sh.b * sh.m * sh.dp, sh.s, sh.layers, sh.h, sh.vocab, sh.block.matmul_params())


def hardware_flops_per_step(sh: Shape) -> float:
    """What the GPUs execute: full recompute runs each block's forward twice (Narayanan 2021 eq. 3,
    96*B*s*L*h^2*(1 + s/6h + V/16Lh)); selective recomputes elementwise work only and is counted as none."""
    flops = flops_per_step(sh)
    if sh.recompute == "full":
        tokens = sh.b * sh.m * sh.dp * sh.s
        flops += tokens * sh.layers * (2 * sh.block.matmul_params() + 4 * sh.s * sh.h)
    return flops


def tokens_per_step(sh: Shape) -> int:
    return sh.b * sh.m * sh.dp * sh.s


# -- communication (Narayanan et al. 2021, section 3; ring volumes per rank) ----------------------------------------
def wire_bytes(kind: str, payload: float, n: int) -> float:
    """Bytes one rank sends for one collective over ``n`` ranks with ring algorithms; ``payload`` is the whole
    buffer (an all-gather's output, a reduce-scatter's input). The measured side (hpcmega.parallel.comm_stats) uses
    the same convention, so measurement and estimate compare directly."""
    if n <= 1 or kind == "recv":
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * payload
    if kind in ("send", "broadcast"):
        return float(payload)
    return (n - 1) / n * payload  # all_gather, reduce_scatter, all_to_all


def _rank_stages(sh: Shape, pp_rank: int) -> tuple[list[int], int]:
    stages = stage_ids_for_rank(pp_rank, sh.pp, sh.v, sh.schedule)
    return stages, sum(len(layers_for_stage(st, sh.pp * sh.v, sh.layers)) for st in stages)


def tp_bytes(sh: Shape, pp_rank: int) -> float:
    """Per microbatch, in all-reduce equivalents (an all-gather + reduce-scatter pair with SP moves the same bytes):
    4 per block (6 with full recompute: the recomputed forward repeats its two); on the first stage one for the
    token embedding (b*s*h) and one for the position embedding (s*h, shared by the micro-batch); on the last stage
    one for the column-parallel head's input. With SP the gradients of the replicated block parameters that only
    see a sequence shard (both LayerNorms, the wo and fc2 biases: 6h per block; 2h for the final norm) are partial
    sums over tp, all-reduced once per step in fp32 in one buffer -- after FSDP2's reduce-scatter, so 1/dp of them
    (hpcmega.parallel.grad_sync)."""
    if sh.tp == 1:
        return 0.0
    stages, n_layers = _rank_stages(sh, pp_rank)
    first, last = 0 in stages, sh.pp * sh.v - 1 in stages
    sbh = sh.tokens_per_microbatch * sh.h
    per_block = 4 + (2 if sh.recompute == "full" else 0)
    positions = sh.s * sh.h if sh.family == "gpt2" else 0  # GPT-2's position table, shared by the micro-batch
    elements = n_layers * per_block * sbh + first * (sbh + positions) + last * sbh
    total = wire_bytes("all_reduce", elements * sh.compute_bytes * sh.m, sh.tp)
    block = sh.block
    partial = n_layers * block.partial_grad_elements(sh.sp, sh.tp) + last * block.final_norm_partial_elements(
        sh.sp, sh.tp)
    partial //= sh.dp if sh.fsdp else 1
    if partial:
        total += wire_bytes("all_reduce", FP32 * partial, sh.tp)
    return total


@functools.lru_cache(maxsize=8)
def _stage_owners(pp: int, v: int, schedule: str) -> dict[int, int]:
    """Stage -> the pipeline rank holding it (cached: pp_sends asks once per rank, which was O(pp^2))."""
    return {st: r for r in range(pp) for st in stage_ids_for_rank(r, pp, v, schedule)}


def pp_sends(sh: Shape, pp_rank: int) -> int:
    """Stage boundaries this rank sends across per microbatch: an activation forward to the next stage and a
    gradient backward to the previous one, when that stage lives on another rank."""
    if sh.pp == 1:
        return 0
    num_stages = sh.pp * sh.v
    owner = _stage_owners(sh.pp, sh.v, sh.schedule)
    stages, _ = _rank_stages(sh, pp_rank)
    return sum((st + 1 < num_stages and owner[st + 1] != pp_rank) + (st > 0 and owner[st - 1] != pp_rank)
               for st in stages)


def comm_bytes_per_step(sh: Shape) -> dict[str, int]:
    """Bytes a GPU sends per step along tp, pp and dp -- the most any pipeline rank sends, per dimension."""
    e = sh.compute_bytes
    dp = 0.0
    if sh.dp > 1:
        count = max(rank_memory(sh, r).param_count for r in range(sh.pp))
        if sh.ddp:  # one bucketed fp32 gradient all-reduce per step (no_sync before the last microbatch)
            dp = wire_bytes("all_reduce", count * FP32, sh.dp)
        else:  # ZeRO-3 at pp = 1 gathers each unit in every forward and backward; otherwise once per step
            gathers = 2 * sh.m if sh.pp == 1 and sh.reshard_after_forward else 1
            reductions = sh.m if sh.reduce_every_microbatch else 1
            dp = wire_bytes("all_gather", count * gathers * e, sh.dp)
            dp += wire_bytes("reduce_scatter", count * reductions * FP32, sh.dp)
    return {
        "tp": int(max(tp_bytes(sh, r) for r in range(sh.pp))),
        "pp": max(pp_sends(sh, r) for r in range(sh.pp)) * boundary_bytes(sh) * sh.m,
        "dp": int(dp),
    }


@dataclass
class Estimate:
    shape: Shape
    gpu: GPU | None
    gpu_mem_gib: float | None
    mfu: float
    ranks: list[RankMemory]
    bubble: float
    flops_per_step: float
    tokens_per_step: int
    est_step_s: float | None
    comm: dict[str, int]
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def peak_gib(self) -> float:
        return self.worst.peak / GIB

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem_gib is None else self.peak_gib <= self.gpu_mem_gib

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step / self.est_step_s if self.est_step_s else None

    def memory_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name if self.gpu else None,
            "gpu_mem_gib": self.gpu_mem_gib,
            "stages": [r.to_json() for r in self.ranks],
            "peak_gib": gib(self.worst.peak),
            "fits": self.fits,
        }

    def to_json(self) -> dict[str, Any]:
        """The keys `hpcmega plan --json` adds (the JSON contract of docs/planning.md)."""
        return {
            "memory": self.memory_json(),
            "activation_bytes_per_layer": self.per_layer,
            "bubble": round(self.bubble, 6),
            "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "est_step_s": None if self.est_step_s is None else round(self.est_step_s, 6),
            "comm_bytes_per_step": self.comm,
        }


def step_time_s(sh: Shape, gpu: GPU, mfu: float, bubble: float, comm: dict[str, int]) -> float:
    """Compute time at ``mfu`` of the bf16 peak, stretched by the bubble, plus TP traffic (on the critical path,
    over NVLink) and PP traffic (between nodes); DP traffic overlaps compute and only shows when it is longer."""
    world = sh.tp * sh.pp * sh.dp
    compute = hardware_flops_per_step(sh) / (world * gpu.bf16_tflops * 1e12 * mfu)
    busy = compute / (1.0 - bubble) + comm["tp"] / (gpu.nvlink_gb_s * 1e9) + comm["pp"] / (INTERNODE_GB_S * 1e9)
    return max(busy, comm["dp"] / (INTERNODE_GB_S * 1e9))


def estimate(sh: Shape, gpu: GPU | None = None, gpu_mem_gib: float | None = None, mfu: float = 0.4) -> Estimate:
    bubble = bubble_fraction(sh.schedule, sh.pp, sh.v, sh.m)
    comm = comm_bytes_per_step(sh)
    mem = gpu_mem_gib if gpu_mem_gib is not None else (gpu.memory_gib if gpu else None)
    return Estimate(
        shape=sh,
        gpu=gpu,
        gpu_mem_gib=mem,
        mfu=mfu,
        ranks=[rank_memory(sh, r) for r in range(sh.pp)],
        bubble=bubble,
        flops_per_step=flops_per_step(sh),
        tokens_per_step=tokens_per_step(sh),
        est_step_s=step_time_s(sh, gpu, mfu, bubble, comm) if gpu else None,
        comm=comm,
        per_layer={mode: activation_bytes_per_layer(sh, mode) for mode in ("none", "selective", "full")},
    )


def gpu_of(cfg: Config) -> tuple[GPU, float]:
    """The GPU model and the memory (GiB) to plan for: ``cluster.gpu`` from the table, ``gpu_mem_gib`` if set."""
    gpu = get_gpu(cfg.cluster.gpu)  # cluster.gpu_mem_gib and cluster.mfu bounds are checked by validate()
    return gpu, cfg.cluster.gpu_mem_gib or gpu.memory_gib


def estimate_config(cfg: Config) -> Estimate:
    gpu, mem = gpu_of(cfg)
    return estimate(Shape.from_config(cfg), gpu, mem, cfg.cluster.mfu)

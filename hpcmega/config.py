"""One typed configuration for a run: model, parallelism, training, cluster, logging, checkpoint.

Every field is declared once, in the section dataclasses below (``setting(default, help, bounds...)``); flags,
TOML key checks, bound/choice validation, ``--set`` and ``config show`` are derived from that declaration, so a new
field needs no edit anywhere else (docs/configuration.md).

Sources, lowest to highest priority: defaults -> model preset -> site profile -> TOML files (left to right) ->
flags -> ``--set section.key=value``. Pure Python (no torch) so the CLI stays fast and validation is cheap.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from hpcmega import schedules
from hpcmega.errors import ConfigError
from hpcmega.gpus import GPU_NAMES


# ---------------------------------------------------------------------------------------------------------------------
# Model presets. GPT-2 family: ``tiny`` is for tests and CPU demos; its 8 heads and 8 layers take tp in {1, 2, 4, 8}
# and pp in {1, 2, 4} (also with two stages per rank), so any layout of 8-GPU nodes plans with it.
# Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention; hpcmega.models.llama): the published Llama 3 shapes
# (Llama 3.2's with its long-context RoPE scaling) and ``llama-tiny`` for tests and CPU demos: GPT-2's padded
# vocabulary (so it trains on `data prepare`'s GPT-2 tokens), 8 heads sharing 2 kv heads (tp 2 splits the kv heads,
# tp 4 and 8 replicate them).
def _gpt2(**shape: int) -> dict[str, Any]:
    return dict(family="gpt2", n_kv_heads=0, ffn_hidden=0, tie_embeddings=False, qkv_bias=False, **shape)


def _llama(**shape: Any) -> dict[str, Any]:
    return {**dict(family="llama", tie_embeddings=False, qkv_bias=False, rope_theta=500000.0, rope_scaling=0.0,
                   norm_eps=1e-5), **shape}


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _gpt2(vocab_size=256, d_model=64, n_layers=8, n_heads=8, max_seq_len=256),
    "gpt2-124m": _gpt2(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "gpt2-350m": _gpt2(vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    "gpt-1.3b": _gpt2(vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, max_seq_len=2048),
    "gpt-7b": _gpt2(vocab_size=50304, d_model=4096, n_layers=32, n_heads=32, max_seq_len=2048),
    "gpt3-175b": _gpt2(vocab_size=50304, d_model=12288, n_layers=96, n_heads=96, max_seq_len=2048),
    "llama-tiny": _llama(vocab_size=50304, d_model=128, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden=384,
                         max_seq_len=256, rope_theta=10000.0),
    "llama3.2-1b": _llama(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                          max_seq_len=8192, tie_embeddings=True, rope_scaling=32.0),
    "llama3-8b": _llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                        max_seq_len=8192),
    "llama3-70b": _llama(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                         max_seq_len=8192),
}
# Training shape each preset is meant for: its context length and a batch of about 0.5M (GPT-2 sizes) to 2-4M
# (1.3B and up) tokens per step, GPT-3 paper style. Used where train.seq_len / global_batch / micro_batch are unset.
PRESET_TRAIN: dict[str, dict[str, int]] = {
    "tiny": dict(seq_len=64, global_batch=8, micro_batch=1),
    "gpt2-124m": dict(seq_len=1024, global_batch=512, micro_batch=8),
    "gpt2-350m": dict(seq_len=1024, global_batch=512, micro_batch=4),
    "gpt-1.3b": dict(seq_len=2048, global_batch=1024, micro_batch=2),
    "gpt-7b": dict(seq_len=2048, global_batch=2048, micro_batch=1),
    "gpt3-175b": dict(seq_len=2048, global_batch=1536, micro_batch=1),
    "llama-tiny": dict(seq_len=64, global_batch=8, micro_batch=1),
    "llama3.2-1b": dict(seq_len=8192, global_batch=512, micro_batch=1),
    "llama3-8b": dict(seq_len=8192, global_batch=512, micro_batch=1),
    "llama3-70b": dict(seq_len=8192, global_batch=512, micro_batch=1),
}
# Value of a string field that means "unset: chosen by resolve_defaults()" (an explicit value always wins).
AUTO = "auto"
# The GPT-2 BPE's token ids are 0..50256; models pad their embedding beyond it (e.g. 50304). The data layer's
# tokenizer and the `train.data = auto` rule below both ask this one number.
GPT2_VOCAB_SIZE = 50257
SYNTHETIC = "synthetic"  # train.data: tokens from the seed (hpcmega.data.synthetic), no files


def demo_data_location() -> str:
    """Where `train.data = auto` finds (or the pre-flight prepares) the Shakespeare demo corpus in GPT-2 tokens:
    ``$HPCMEGA_CACHE/shakespeare-gpt2``, the cache defaulting to ``$XDG_CACHE_HOME/hpcmega`` or
    ``~/.cache/hpcmega``. On a cluster it must be on a filesystem the nodes share (home folders usually are)."""
    cache = os.environ.get("HPCMEGA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcmega")
    return os.path.join(os.path.abspath(cache), "shakespeare-gpt2")
# GPUs per node assumed for a GPU job when neither the user nor SLURM's GRES says (the common 8-GPU node).
DEFAULT_GPUS_PER_NODE = 8
# The fields resolve_defaults() fills when they are unset (AUTO or 0).
RESOLVED_BY_RULE = ("cluster.gpus_per_node", "train.precision", "parallel.recompute", "train.seq_len",
                    "train.micro_batch", "train.global_batch")

RANK_ORDERS = ("tp-dp-pp", "tp-pp-dp")
# Model families (hpcmega.models): the block each builds and what it needs from [model].
FAMILIES = ("gpt2", "llama")
RECOMPUTE_MODES = ("none", "selective", "full")
PRECISIONS = ("fp32", "bf16")
# How data-parallel ranks hold the model (hpcmega.parallel.parallelize; docs/engine.md).
DATA_PARALLEL_MODES = ("fsdp", "replicate")
# What a GPU job and a CPU job use when the user does not say (see resolve_defaults).
GPU_DEFAULTS = {"train.precision": "bf16", "parallel.recompute": "selective"}
CPU_DEFAULTS = {"train.precision": "fp32", "parallel.recompute": "none"}
WANDB_MODES = ("online", "offline", "disabled")
# W&B's own rules for names (wandb 0.31 wandb_settings.validate_project / validate_run_tags), checked before anything
# is queued: W&B itself refuses them only when the ranks start logging. Run names and groups: the same 128 characters.
WANDB_PROJECT = dict(max_len=128, forbidden="/\\#?%:")
WANDB_NAME = dict(max_len=128)
WANDB_TAG = dict(max_len=64, min_len=1)

# Upper bounds of counts and sizes: far above any real job, low enough that nothing allocates or loops in
# proportion to a hostile value (10^30 nodes, 10^8 layers) and that no timeout overflows a timedelta on the ranks.
MAX_NODES = 100_000
MAX_GPUS_PER_NODE = 1024
MAX_WORLD = 1 << 18  # ranks of one job, and of one NVLink domain (`plan` lists every rank: ~3 s at 131,072)
MAX_LAYERS = 10_000
MAX_WIDTH = 1 << 17  # d_model, heads: 8x today's widest models
MAX_VOCAB = 1 << 24
MAX_SEQ = 1 << 22  # tokens per sequence
MAX_BATCH = 1 << 24  # sequences per step, microbatch, microbatches
MAX_STEPS = 99_999_999  # checkpoint folders are named step-NNNNNNNN (hpcmega.checkpoint.store)
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week; timedelta overflows at ~8.6e13 s
MAX_SIGNAL_GRACE_S = 65535  # the largest sig_time sbatch --signal accepts
MAX_COUNT = 1_000_000  # other counts (eval batches, requeues, kept checkpoints, ...)


# ---------------------------------------------------------------------------------------------------------------------
# Field declarations. Each field is declared once, here: name, type and default by the dataclass, the rest by
# ``setting(...)``. The CLI flags (hpcmega.commands.options), the TOML key checks, the bound/choice checks in
# hpcmega.planning.validate, ``--set`` and ``config show --sources`` are all derived from these declarations.
@dataclass(frozen=True)
class Spec:
    """What a field means beyond its type: help text, flag, bounds and choices."""

    help: str
    flag: str | None = ""  # "" = derived from the name (--snake-case, --x/--no-x for bools); None = no flag
    ge: float | None = None  # bounds (greater/less than or equal), checked by hpcmega.planning.validate
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    zero: str = ""  # what 0 means, e.g. "derived" (shown in messages and help)
    max_len: int | None = None  # text fields (each item of a list field): at most this many characters ...
    min_len: int = 0  # ... at least this many
    forbidden: str = ""  # ... and none of these characters (W&B refuses '/' in a project name only at the 1st step)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            **spec: Any) -> Any:
    """A config field: ``lr: float = setting(1e-3, "Peak learning rate.", gt=0)``."""
    meta = {"spec": Spec(help=help, **spec)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    preset: str = setting("tiny", "Model preset; sets the shape fields below (which may then be overridden).",
                          flag="--model", choices=tuple(MODEL_PRESETS))
    family: str = setting("gpt2", "Block architecture: gpt2 (learned positions, LayerNorm, GELU MLP, biases) or "
                                  "llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases).",
                          choices=FAMILIES)
    vocab_size: int = setting(256, "Vocabulary size (a multiple of tp).", ge=1, le=MAX_VOCAB)
    d_model: int = setting(64, "Hidden size (a multiple of n_heads).", ge=1, le=MAX_WIDTH)
    n_layers: int = setting(8, "Transformer blocks.", flag="--layers", ge=1, le=MAX_LAYERS)
    n_heads: int = setting(8, "Attention heads (a multiple of tp).", flag="--heads", ge=1, le=MAX_WIDTH)
    n_kv_heads: int = setting(0, "Key/value heads (llama: grouped-query attention; divides n_heads).",
                              flag="--kv-heads", ge=0, le=MAX_WIDTH, zero="n_heads")
    ffn_hidden: int = setting(0, "MLP hidden size (llama: the SwiGLU width; a multiple of tp).", ge=0,
                              le=8 * MAX_WIDTH, zero="4 x d_model")
    max_seq_len: int = setting(256, "Longest sequence (gpt2: size of the position table; >= train.seq_len).", ge=1,
                               le=MAX_SEQ)
    rope_theta: float = setting(10000.0, "llama: RoPE base frequency.", gt=0)
    rope_scaling: float = setting(0.0, "llama: Llama 3.1's long-context RoPE scaling factor (HF rope_type 'llama3'): "
                                       "low frequencies divided by it, high ones kept, the band between "
                                       "interpolated.", ge=0, le=1e6, zero="no scaling")
    rope_low_freq_factor: float = setting(1.0, "llama, with rope_scaling: wavelengths longer than "
                                               "rope_original_max_seq_len / this are scaled fully.", gt=0)
    rope_high_freq_factor: float = setting(4.0, "llama, with rope_scaling: wavelengths shorter than "
                                                "rope_original_max_seq_len / this are kept (> "
                                                "rope_low_freq_factor).", gt=0)
    rope_original_max_seq_len: int = setting(8192, "llama, with rope_scaling: the context length before scaling.",
                                             ge=1, le=MAX_SEQ)
    norm_eps: float = setting(1e-5, "Epsilon of the LayerNorms (gpt2) / RMSNorms (llama).", gt=0)
    tie_embeddings: bool = setting(False, "llama: the head reuses the token embedding's weight (needs pp = 1).")
    qkv_bias: bool = setting(False, "llama: biases on the q/k/v projections (Qwen2-style).")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class ParallelConfig:
    tp: int = setting(1, "Tensor-parallel size (inside one node / NVLink domain).", ge=1, le=MAX_WORLD)
    pp: int = setting(1, "Pipeline-parallel size.", ge=1, le=MAX_LAYERS)
    dp: int = setting(0, "Data-parallel size; must equal world / (tp x pp).", ge=0, le=MAX_WORLD,
                      zero="derived")
    data_parallel: str = setting("fsdp", "How dp ranks hold the model: fsdp = FSDP2 shards parameters, gradients and "
                                         "optimizer state over dp; replicate = a full copy per rank, gradients "
                                         "all-reduced once per step (needs tp = pp = 1).",
                                 choices=DATA_PARALLEL_MODES)
    sequence_parallel: bool = setting(True, "Sequence parallel for norms/dropout (only with tp > 1).")
    schedule: str = setting(schedules.DEFAULT_SCHEDULE, "Pipeline schedule (facts: hpcmega/schedules.py).",
                            choices=tuple(schedules.SCHEDULES))
    virtual_stages: int = setting(1, "Stages per pipeline rank (interleaved schedules; zbv/dualpipev use 2).", ge=1,
                                  le=MAX_LAYERS)
    microbatches: int = setting(0, "Microbatches per step on one DP rank = global_batch / (dp x micro_batch).",
                                ge=0, le=MAX_BATCH, zero="derived")
    order: str = setting("tp-dp-pp", "Rank order, fastest-varying dimension first.", choices=RANK_ORDERS)
    recompute: str = setting(AUTO, "Activation recomputation; auto = selective for GPU jobs, none for CPU jobs.",
                             choices=RECOMPUTE_MODES)
    reshard_after_forward: bool | None = setting(None, "FSDP2: free gathered params after forward (ZeRO-3) or "
                                                       "keep them (ZeRO-2); auto = off with pp > 1, on otherwise.")
    reduce_every_microbatch: bool | None = setting(
        None, "FSDP2 with pp = 1 and several microbatches: reduce-scatter gradients after every microbatch (sharded "
              "gradients only) or after the last (fp32 unsharded accumulators, 1/m of the traffic); auto = every "
              "microbatch with reshard_after_forward (ZeRO-3), the last otherwise.")
    compile: bool = setting(False, "torch.compile each block.")


@dataclass
class TrainConfig:
    steps: int = setting(20, "Optimizer steps.", ge=1, le=MAX_STEPS)
    global_batch: int = setting(0, "Sequences per optimizer step, independent of the layout.", ge=0, le=MAX_BATCH,
                                zero="the model preset's, rounded up to a multiple of dp x micro_batch x pp")
    micro_batch: int = setting(0, "Sequences per microbatch on one DP rank.", ge=0, le=MAX_BATCH,
                              zero="the model preset's")
    seq_len: int = setting(0, "Tokens per sequence.", ge=0, le=MAX_SEQ,
                          zero="the model preset's (GPT-2 sizes 1024, larger 2048)")
    lr: float = setting(1e-3, "Peak learning rate.", gt=0)
    min_lr: float = setting(1e-4, "Learning rate at the end of the cosine decay (<= lr).", ge=0)
    warmup_steps: int = setting(2, "Linear warmup steps.", ge=0, le=MAX_STEPS)
    weight_decay: float = setting(0.1, "AdamW weight decay.", ge=0)
    beta1: float = setting(0.9, "AdamW beta1.", flag="--adam-beta1", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2.", flag="--adam-beta2", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon.", flag="--adam-eps", gt=0)
    grad_clip: float = setting(1.0, "Global grad-norm clip.", ge=0, zero="no clipping")
    seed: int = setting(0, "Seed of the weights and the synthetic data.", ge=0, le=2**63 - 1)
    precision: str = setting(AUTO, "Compute precision; auto = bf16 for GPU jobs (fp32 master weights and gradient "
                                   "reduction), fp32 for CPU jobs.", choices=PRECISIONS)
    max_consecutive_skips: int = setting(5, "Stop the run after this many consecutive steps skipped for a "
                                            "non-finite loss or gradient norm.", ge=1, le=MAX_COUNT)
    data: str = setting(AUTO, "'synthetic' (tokens from the seed) or the fsspec URL of shards from `hpcmega data "
                              "prepare`; auto = the Shakespeare demo corpus in GPT-2 tokens (prepared on first use "
                              "under $HPCMEGA_CACHE, default ~/.cache/hpcmega) when the model's vocabulary holds "
                              "GPT-2's 50257 tokens, synthetic tokens otherwise.")
    eval_every: int = setting(0, "Compute val_loss on the held-out split every N steps (and at the last step).",
                              ge=0, le=MAX_STEPS, zero="no evaluation")
    eval_batches: int = setting(4, "Held-out global batches per evaluation (the same ones every time).", ge=1,
                               le=MAX_COUNT)


@dataclass
class ClusterConfig:
    nodes: int = setting(1, "Nodes.", ge=1, le=MAX_NODES)
    gpus_per_node: int = setting(0, "GPUs per node, one task each (with --cpu: tasks per node).", ge=0,
                                 le=MAX_GPUS_PER_NODE,
                                 zero="the partition's GPU GRES (sinfo), else 8; with --cpu 1")
    cpu: bool = setting(False, "CPU-only nodes with gloo (tests, machines without GPUs).", flag="--cpu/--no-cpu")
    nvlink_domain_nodes: int = setting(1, "Nodes per NVLink domain (18 for GB200 NVL72 trays).", ge=1,
                                       le=MAX_NODES)
    gpu: str = setting("h100", "GPU model (hpcmega.gpus): memory for the fit check, peak for time "
                               "estimates.", choices=tuple(GPU_NAMES))
    gpu_mem_gib: float = setting(0.0, "Memory per GPU to plan for, GiB.", ge=0, zero="the GPU model's own")
    mfu: float = setting(0.4, "Model-FLOPs utilisation `plan` assumes for step-time estimates.", gt=0, le=1)
    partition: str = setting("", "SLURM partition.")
    account: str = setting("", "SLURM account to charge.")
    qos: str = setting("", "SLURM quality of service.")
    time: str = setting("01:00:00", "SLURM time limit, [D-]HH:MM:SS or minutes.")
    constraint: str = setting("", "SLURM node features, e.g. 'h100&ib'.")
    exclusive: bool = setting(False, "Whole nodes only.")
    job_name: str = setting("", "SLURM job name; empty = the run folder's name.")
    mem: str = setting("", "Memory per node, e.g. 64G, or 0 for all; empty = site default.")
    cpus_per_task: int = setting(0, "CPUs per task (per GPU).", ge=0, le=MAX_COUNT, zero="site default")
    sbatch_extra: list[str] = setting(help="Extra sbatch option, passed through (repeatable; flags add to the "
                                           "files' list): --sbatch=--reservation=foo",
                                      factory=list, flag="--sbatch")
    signal_grace_s: int = setting(120, "SLURM sends USR2 this many seconds before the time limit (time to save).",
                                  ge=0, le=MAX_SIGNAL_GRACE_S)
    max_requeues: int = setting(3, "Preemptions / time limits survived by requeueing.", ge=0,
                                  le=MAX_COUNT)
    max_restarts: int = setting(3, "Crashed attempts (a rank died, a collective failed) after which the job "
                                   "requeues itself from its newest intact checkpoint (separate from "
                                   "max_requeues; a failure before the first step is never retried).", ge=0,
                                le=MAX_COUNT)
    master_port: int = setting(0, "Rendezvous TCP port.", ge=0, le=65535, zero="derived from the job id")
    requeue: bool = setting(True, "Let SLURM requeue the job after preemption / time limit / node failure "
                                  "(sbatch --requeue or --no-requeue); with --no-requeue a stopped job only saves.")
    setup: list[str] = setting(help="Shell line run before the ranks start, e.g. 'module load cuda/12.4' or "
                                    "'source venv/bin/activate' (repeatable).", factory=list)
    env: dict[str, str] = setting(help="Environment variable for every rank: --env NCCL_DEBUG=INFO (repeatable; "
                                       "[cluster.env] in TOML).", factory=dict)
    container_image: str = setting("", "Run the ranks in this container image (pyxis: an image name; apptainer: "
                                       "a .sif file); empty = no container.", flag="--container")
    container_runtime: str = setting("pyxis", "How the container is started: pyxis (srun --container-image) or "
                                              "apptainer (apptainer exec).", choices=("pyxis", "apptainer"))
    container_mounts: list[str] = setting(help="Bind mount SRC:DST into the container (repeatable; the run folder "
                                               "is always mounted).", factory=list, flag="--container-mount")
    collective_timeout_s: int = setting(600, "Seconds a rank waits in a training collective before the job "
                                             "aborts, once the first step is done (checkpoints use "
                                             "checkpoint.timeout_s).", ge=1, le=MAX_TIMEOUT_S)
    first_step_timeout_s: int = setting(1800, "Seconds a collective may wait until the first training step is "
                                              "done: model build, checkpoint load and torch.compile's first "
                                              "compile on every rank.", ge=1, le=MAX_TIMEOUT_S)


@dataclass
class LoggingConfig:
    wandb: str = setting("offline", "W&B mode (offline writes under the run folder; `hpcmega sync` uploads).",
                         choices=WANDB_MODES)
    project: str = setting("hpcmega", "W&B project.", flag="--wandb-project", **WANDB_PROJECT)
    entity: str = setting("", "W&B entity (team or user); empty = your default.", flag="--wandb-entity",
                         **WANDB_PROJECT)
    run_name: str = setting("", "Run name (run folder and W&B); empty = the model preset.",
                           **WANDB_NAME)
    group: str = setting("", "W&B group (a sweep's points share one; default for a sweep: the sweep folder's "
                             "name).", flag="--wandb-group", **WANDB_NAME)
    tags: list[str] = setting(help="W&B tag (repeatable).", factory=list, flag="--wandb-tags",
                               **WANDB_TAG)
    log_every: int = setting(1, "Print and log every N steps.", ge=1, le=MAX_STEPS)
    comm_stats: bool = setting(False, "Record every step's collectives into metrics.jsonl: bytes sent per mesh "
                                      "dimension (comm_bytes) and per collective (comm_ops); slows the step.")


@dataclass
class CheckpointConfig:
    url: str = setting("", "fsspec URL for checkpoints; empty = RUN_DIR/checkpoints.", flag="--ckpt-url")
    save_every: int = setting(0, "Save every N steps.", ge=0, le=MAX_STEPS, zero="only at the end and on preemption")
    keep: int = setting(3, "Checkpoints to keep.", ge=1, le=MAX_COUNT)
    resume: str = setting("auto", "auto | none | a checkpoint URL.")
    init_from: str = setting("", "Checkpoint (step folder, location or run folder) whose model weights start this "
                                 "run when there is nothing to resume: step 0, fresh optimizer and data position; "
                                 "the model section is read from it (e.g. `hpcmega ckpt import --from hf`).",
                             flag="--init-from")
    verify_checksums: bool = setting(True, "Check every checkpoint file's SHA-256 on load (sizes are always "
                                           "checked); off for huge checkpoints.")
    trust: bool = setting(False, "Load a checkpoint from outside the run's own checkpoint location (--resume, "
                                 "sample, ckpt export; DCP unpickles its .metadata: only checkpoints you trust).",
                          flag="--trust-checkpoint/--no-trust-checkpoint")
    timeout_s: int = setting(1800, "Seconds checkpoint save/load collectives may take (their own gloo group): "
                                   "slow storage is not a hang.", flag="--ckpt-timeout", ge=1,
                          le=MAX_TIMEOUT_S)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = setting("", "Run folder (set by `run`/`submit --run-dir`).", flag=None)

    # -- derived quantities -----------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel degree derived from the world size (validation guarantees divisibility)."""
        return self.parallel.dp or max(1, self.world_size // max(1, self.parallel.tp * self.parallel.pp))

    @property
    def microbatches(self) -> int:
        """Microbatches per step on one DP rank (pipeline microbatches or gradient-accumulation steps)."""
        return self.microbatches_for(self.dp)

    def microbatches_for(self, dp: int) -> int:
        """Microbatches per step on one rank of a data-parallel group of ``dp`` (the one rule; the ranks ask it
        with their mesh's dp)."""
        return self.parallel.microbatches or max(1, self.train.global_batch // max(1, dp * self.train.micro_batch))

    @property
    def stages_per_rank(self) -> int:
        schedule = schedules.SCHEDULES.get(self.parallel.schedule)  # unknown names are refused by validation
        return schedule.stages_on_each_rank(self.parallel.virtual_stages) if schedule else 1

    @property
    def sequence_parallel(self) -> bool:
        return self.parallel.sequence_parallel and self.parallel.tp > 1

    @property
    def reshard_after_forward(self) -> bool:
        """Whether FSDP2 frees gathered parameters after each forward.

        - Split-backward schedules (zero-bubble family) at pp > 1: always off. Their input/weight backward split
          looks parameters up by autograd node right after the forward; resharded parameters make the last stage's
          weight gradients silently vanish (measured: None grads, wrong losses). Off is exact.
        - Otherwise an explicit ``parallel.reshard_after_forward`` wins.
        - Auto (None): off with pp > 1 (on, every microbatch would all-gather the parameters again in forward and
          in backward: for GPT-3 175B at tp8 pp8 dp16, m=96 about 1 TB per GPU per step), on with pp = 1 (one
          forward and one backward per step; freeing the gathered parameters is ZeRO-3's memory saving).
        """
        p = self.parallel
        schedule = schedules.SCHEDULES.get(p.schedule)
        if p.pp > 1 and schedule is not None and schedule.split_backward:
            return False
        if p.reshard_after_forward is not None:
            return p.reshard_after_forward
        return p.pp == 1

    @property
    def reduce_every_microbatch(self) -> bool:
        """Whether gradient accumulation (pp = 1, FSDP2) reduce-scatters after every microbatch.

        - Inside a pipeline (pp > 1) never: torch.distributed.pipelining owns the sync and reduces after the last
          backward (the per-microbatch traffic would multiply by m on every stage).
        - Otherwise an explicit ``parallel.reduce_every_microbatch`` wins.
        - Auto (None): on with ``reshard_after_forward`` (ZeRO-3, as torchtitan): without it the rank keeps an fp32
          unsharded gradient accumulator for its whole model for the step (gpt-7b at dp = 32: 27.8 GiB of buffers
          instead of 3.7), which is the memory ZeRO-3 is there to save; off for ZeRO-2, whose gathered parameters
          are held for the step anyway and whose point is the traffic.
        """
        p = self.parallel
        if p.pp > 1:
            return False
        if p.reduce_every_microbatch is not None:
            return p.reduce_every_microbatch
        return self.reshard_after_forward

    # -- (de)serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        def no_nulls(d: dict[str, Any]) -> dict[str, Any]:
            return {k: no_nulls(v) if isinstance(v, dict) else toml_safe(v) for k, v in d.items()}

        return tomli_w.dumps(no_nulls(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return resolve_layers([("dict", flatten(data, "config"))]).config


# ---------------------------------------------------------------------------------------------------------------------
# The declared fields, by dotted key.
@dataclass(frozen=True)
class FieldInfo:
    key: str  # "parallel.tp" ("run_dir" for top-level fields)
    type: Any
    default: Any
    spec: Spec

    @property
    def optional(self) -> bool:
        """Declared ``X | None``: None (written "auto") means the value is decided at run time."""
        return type(None) in get_args(self.type)

    @property
    def value_type(self) -> Any:
        """The type of a value that is given (``X`` of ``X | None``)."""
        return next((a for a in get_args(self.type) if a is not type(None)), None) if self.optional else self.type

    @property
    def decls(self) -> str | None:
        """The click declaration: "--tp", "--cpu/--gpu", "--compile/--no-compile"; None = no flag."""
        if self.spec.flag is None:
            return None
        if self.spec.flag:
            return self.spec.flag
        name = "--" + self.key.rsplit(".", 1)[-1].replace("_", "-")
        return f"{name}/--no-{name[2:]}" if self.value_type is bool else name

    @property
    def flag(self) -> str | None:
        """The flag users type ("--tp"), for messages."""
        return self.decls.split("/")[0] if self.decls else None

    @property
    def is_list(self) -> bool:
        return getattr(self.type, "__origin__", None) is list

    @property
    def is_dict(self) -> bool:
        return getattr(self.type, "__origin__", None) is dict


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _collect_fields() -> dict[str, FieldInfo]:
    out: dict[str, FieldInfo] = {}
    hints = get_type_hints(Config)
    for f in fields(Config):
        if dataclasses.is_dataclass(hints[f.name]):
            section_hints = get_type_hints(hints[f.name])
            for sf in fields(hints[f.name]):
                key = f"{f.name}.{sf.name}"
                out[key] = FieldInfo(key, section_hints[sf.name], _default_of(sf), sf.metadata["spec"])
        else:
            out[f.name] = FieldInfo(f.name, hints[f.name], _default_of(f), f.metadata["spec"])
    return out


FIELDS: dict[str, FieldInfo] = _collect_fields()
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(k.split(".")[0] for k in FIELDS if "." in k))


def _lower(info: FieldInfo) -> str:
    """'positive', '0 or more', 'in [0, 1)': a field's declared range as a value below it needs to hear it."""
    s = info.spec
    low = f"[{s.ge:g}" if s.ge is not None else f"({s.gt:g}" if s.gt is not None else None
    high = f"{s.le:g}]" if s.le is not None else f"{s.lt:g})" if s.lt is not None else None
    if info.type is int and s.ge in (0, 1):
        return "positive" if s.ge == 1 else "0 or more"
    if low and high:
        return f"in {low}, {high}"
    if s.gt == 0:
        return "positive"
    if s.ge == 0:
        return "0 or more"
    return f">= {s.ge:g}" if s.ge is not None else f"> {s.gt:g}" if s.gt is not None else f"<= {high}"


def _check_bounds(key: str, info: FieldInfo, value: float) -> None:
    s = info.spec
    too_low = not math.isfinite(value) or (s.ge is not None and value < s.ge) or (s.gt is not None and value <= s.gt)
    too_high = (s.le is not None and value > s.le) or (s.lt is not None and value >= s.lt)
    if too_high and info.type is int:
        raise ConfigError(f"{named(key)}={value} must be at most {int(s.le)}; fix the value")
    if too_low or too_high:
        zero = f" (0 = {s.zero})" if s.zero else ""
        raise ConfigError(f"{named(key)}={value} must be {_lower(info)}{zero}; fix the value")


def _check_text(key: str, info: FieldInfo, text: str) -> None:
    s = info.spec
    bad = [ch for ch in text if ch in s.forbidden or ord(ch) < 32 or ord(ch) == 127]
    if bad:
        refused = f"{' '.join(s.forbidden)} and control characters" if s.forbidden else "control characters"
        raise ConfigError(f"{named(key)}={text!r} contains {bad[0]!r}; W&B refuses {refused} there: remove it")
    if not s.min_len <= len(text) <= (s.max_len or len(text)):
        size = f"{s.min_len} to {s.max_len}" if s.min_len else f"at most {s.max_len}"
        raise ConfigError(f"{named(key)}={text[:40]!r}{'...' if len(text) > 40 else ''} has {len(text)} "
                          f"characters; W&B takes {size}: fix it")


def check_declared(cfg: Config) -> None:
    """Types, bounds, choices and text rules exactly as the fields declare them. Run on every config as it is
    read (resolve_layers), before any default is derived from the values, and again by validate()."""
    for key, info in FIELDS.items():
        value = get_value(cfg, key)
        if info.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{named(key)}={value!r} must be an integer; fix the value")
        if info.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{named(key)}={value!r} must be a number; fix the value")
        s = info.spec
        if any(b is not None for b in (s.ge, s.gt, s.le, s.lt)):
            _check_bounds(key, info, value)
        if s.choices and value not in s.choices and not (value == AUTO and key in RESOLVED_BY_RULE):
            raise ConfigError(f"unknown {named(key)} {value!r}; choose one of: {', '.join(s.choices)}")
        if s.max_len is not None:
            for text in value if info.is_list else [value]:
                _check_text(key, info, str(text))
    _check_world(cfg.cluster)


def _check_world(c: ClusterConfig) -> None:
    """Ranks of the job and of one NVLink domain, each at most MAX_WORLD (GPUs per node still unset count as 1)."""
    per_node = c.gpus_per_node or 1
    for what, nodes, flag in (("nodes", c.nodes, "--nodes"), ("nvlink_domain_nodes", c.nvlink_domain_nodes,
                                                                "--nvlink-domain-nodes")):
        if nodes * per_node > MAX_WORLD:
            raise ConfigError(f"{what}={nodes} x gpus_per_node={per_node} = {nodes * per_node} ranks; hpcmega "
                              f"plans at most {MAX_WORLD} ranks: use a smaller {flag} or --gpus-per-node")


def named(key: str) -> str:
    """'train.lr (--lr)': a key as messages show it, with the flag to type."""
    info = FIELDS.get(key)
    return f"{key} ({info.flag})" if info and info.flag else key


def get_value(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set_value(cfg: Config, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


# ---------------------------------------------------------------------------------------------------------------------
# Reading values: TOML files, flags and --set become "layers" {dotted key: value}, applied left to right.
class Append(list):
    """A list value that adds to the list of the layers before it (repeatable flags such as --sbatch)."""


def toml_safe(value: Any) -> Any:
    """TOML has no null: an optional field that is not set is written "auto" (and read back as None)."""
    return AUTO if value is None else value


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert TOML/CLI values to the field's type, with an error that names the key. An optional field
    (``X | None``) reads None or "auto" as None, anything else as X."""
    args = get_args(typ)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
            return None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        origin = getattr(typ, "__origin__", None)
        if origin is list:
            if isinstance(value, str):
                return [value]
            return [str(v) for v in value]
        if origin is dict:
            if isinstance(value, (list, tuple)):  # repeatable KEY=VALUE flags
                if not all(isinstance(v, str) and "=" in v for v in value):
                    raise ValueError(value)
                value = dict(v.split("=", 1) for v in value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{named(key)}: cannot read {value!r} as {name}; fix the value") from None
    return value


def _unknown_key(origin: str, key: str) -> ConfigError:
    section = key.split(".")[0] if "." in key else ""
    valid = [k for k in FIELDS if k.startswith(section + ".")] if section in SECTIONS else list(FIELDS)
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(f"{origin}: unknown config key '{key}'; {hint}valid keys: {', '.join(valid)}")


def flatten(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """TOML-shaped ``{"parallel": {"tp": 2}}`` -> ``{"parallel.tp": 2}``, refusing keys no field declares."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{key}' is a section; write it as [{key}] in TOML")
            for name, item in value.items():
                dotted = f"{key}.{name}"
                if dotted not in FIELDS:
                    raise _unknown_key(origin, dotted)
                out[dotted] = item
        elif key in FIELDS:
            out[key] = value
        else:
            raise _unknown_key(origin, key)
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """One config file as a layer {dotted key: value}; every key checked against the declarations."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass an existing TOML file (see launch/)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e}); fix the file") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid TOML (nested too deeply); fix the file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    return flatten(data, str(p))


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=3e-4", "cluster.sbatch_extra=['--reservation=x']"]`` -> a layer. Values of non-string fields
    are read as TOML values (numbers, booleans, lists), string fields take the text as written."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: write section.key=value, e.g. --set train.lr=3e-4")
        parent, _, leaf = key.rpartition(".")
        if key not in FIELDS and parent in FIELDS and FIELDS[parent].is_dict:  # --set cluster.env.NCCL_DEBUG=INFO
            out[parent] = {**out.get(parent, {}), leaf: text}
            continue
        if key not in FIELDS:
            raise _unknown_key("--set", key)
        value: Any = text
        if FIELDS[key].type is not str:
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text
            except RecursionError:
                raise ConfigError(f"--set {key}: the value is nested too deeply; give a plain value") from None
        out[key] = value
    return out


def site_path(name: str) -> Path:
    """``--site NAME`` -> ``slurm/sites/NAME.toml``, looked up in $HPCMEGA_SITES, ./slurm/sites, then the sites
    shipped next to the package."""
    dirs = [Path(d) for d in os.environ.get("HPCMEGA_SITES", "").split(os.pathsep) if d]
    dirs += [Path("slurm/sites"), Path(__file__).resolve().parents[1] / "slurm" / "sites"]
    for d in dirs:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(f"site '{name}' not found in {', '.join(map(str, dirs))}; known sites: "
                      f"{', '.join(known) or 'none'} (or add slurm/sites/{name}.toml)")


@dataclass
class Resolved:
    config: Config
    sources: dict[str, str]  # dotted key -> "default" | "preset NAME" | file path | "flag --x" | "--set"


def resolve_layers(layers: list[tuple[str, dict[str, Any]]]) -> Resolved:
    """Apply defaults -> model preset -> layers left to right. The preset is applied first; model shape fields
    from layers *before* the layer that switched to another preset are dropped (a preset on the command line
    replaces the shape a file gave for a different model)."""
    cfg = Config()
    sources = {key: "default" for key in FIELDS}
    preset, preset_source = cfg.model.preset, "default"
    pending: list[tuple[str, Any, str]] = []
    for source, values in layers:
        for key, value in values.items():
            if key != "model.preset":
                pending.append((key, value, source))
            elif value != preset:
                pending = [p for p in pending if not p[0].startswith("model.")]
                preset, preset_source = value, source
    apply_preset(cfg, str(preset))
    sources.update({f"model.{k}": f"preset {preset}" for k in MODEL_PRESETS[preset]})
    sources["model.preset"] = preset_source
    for key, value, source in pending:
        info = FIELDS[key]
        new = _coerce(key, value, info.type)
        if isinstance(value, Append):
            new = list(get_value(cfg, key)) + new
        elif info.is_dict:
            new = {**get_value(cfg, key), **new}
        _set_value(cfg, key, new)
        sources[key] = source
    check_declared(cfg)
    return Resolved(cfg, sources)


def apply_preset(cfg: Config, preset: str) -> None:
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model '{preset}'; choose one of: {', '.join(MODEL_PRESETS)}")
    cfg.model.preset = preset
    for key, value in MODEL_PRESETS[preset].items():
        setattr(cfg.model, key, value)


@dataclass(frozen=True)
class Setting:
    """A value the user did not give, or whose source matters (GPUs per node): what it is and where it came from."""

    key: str  # dotted config key
    value: Any
    source: str  # why this value, and how to change it


def _default_data(cfg: Config) -> Setting:
    """Unset data: real text when the model can read GPT-2's tokens (a first run learns, as nanoGPT's Shakespeare
    does; synthetic tokens stay near ln V at GPT-2's vocabulary for dozens of steps), synthetic tokens otherwise."""
    if cfg.model.vocab_size >= GPT2_VOCAB_SIZE:
        cfg.train.data = demo_data_location()
        return Setting("train.data", cfg.train.data, "the Shakespeare demo corpus (GPT-2 tokens, prepared on first "
                                                     "use); --data URL for your own shards")
    cfg.train.data = SYNTHETIC
    return Setting("train.data", SYNTHETIC, f"the model's {cfg.model.vocab_size}-token vocabulary cannot hold "
                                            f"GPT-2's {GPT2_VOCAB_SIZE}; --data URL for prepared shards")


def resolve_defaults(cfg: Config, on_gpu: bool | None = None,
                     gres: tuple[int, str] | None = None) -> list[Setting]:
    """Fill every field left unset (``auto`` / 0) by its rule and return what was chosen and why.

    The one owner of the "unset -> rule" defaults, so an explicit value (flag, TOML, site profile) always wins and
    calling it twice changes nothing. ``on_gpu`` says whether the ranks run on GPUs (default: not cluster.cpu);
    ``gres`` is the partition's GPUs per node as SLURM reports them, ``(count, description)``, when known.
    """
    gpu = (not cfg.cluster.cpu) if on_gpu is None else on_gpu
    chosen: list[Setting] = []
    c = cfg.cluster
    if not c.gpus_per_node:
        if not gpu:
            c.gpus_per_node = 1
            chosen.append(Setting("cluster.gpus_per_node", 1, "CPU job: 1 task per node; --gpus-per-node N for more"))
        elif gres:
            c.gpus_per_node = gres[0]
            chosen.append(Setting("cluster.gpus_per_node", gres[0], f"{gres[1]}; --gpus-per-node to change"))
        else:
            c.gpus_per_node = DEFAULT_GPUS_PER_NODE
            chosen.append(Setting("cluster.gpus_per_node", DEFAULT_GPUS_PER_NODE,
                                  "GPU job default, no GPU GRES from sinfo; --gpus-per-node to change"))
    kind, rules = ("GPU job default", GPU_DEFAULTS) if gpu else ("CPU job default", CPU_DEFAULTS)
    for key, value in rules.items():
        if get_value(cfg, key) == AUTO:
            _set_value(cfg, key, value)
            others = " or ".join(v for v in FIELDS[key].spec.choices if v != value)
            chosen.append(Setting(key, value, f"{kind}; {FIELDS[key].flag} {others} to change"))
    if cfg.train.data == AUTO:
        chosen.append(_default_data(cfg))
    preset = PRESET_TRAIN.get(cfg.model.preset, PRESET_TRAIN["tiny"])
    for name in ("seq_len", "micro_batch", "global_batch"):
        if getattr(cfg.train, name):
            continue
        value, why = preset[name], f"model {cfg.model.preset}'s default"
        if name == "global_batch":  # whole microbatches on every DP rank, at least one per pipeline stage
            unit = cfg.dp * cfg.train.micro_batch * cfg.parallel.pp
            if value % unit:
                value, why = -(-value // unit) * unit, f"{why} {value} rounded up to a multiple of dp x micro_batch x pp"
        setattr(cfg.train, name, value)
        chosen.append(Setting(f"train.{name}", value, f"{why}; {FIELDS['train.' + name].flag} to change"))
    return chosen


def load_config(path: str | Path | list[str | Path] | None = None, overrides: dict[str, Any] | None = None,
                ) -> Config:
    """Resolve defaults -> preset -> TOML file(s), merged left to right -> overrides ({dotted key: value}; None
    values are "not given")."""
    paths = path if isinstance(path, list) else [path] if path else []
    layers = [(str(p), read_toml(p)) for p in paths]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in given:
        if key not in FIELDS:
            raise _unknown_key("overrides", key)
    layers.append(("override", given))
    return resolve_layers(layers).config

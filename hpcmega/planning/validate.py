"""Every check that can be made before a job is queued, in pure Python (no torch).

``validate(cfg)`` raises ConfigError with a one-line message that names the fix, or returns warnings: things
that will run but probably not the way the user wants. `plan`, `run` and `submit` call it before writing anything,
so a bad layout costs a second on the login node instead of a queue wait and a crash on 32 GPUs.
"""
from __future__ import annotations

import math
import re

from hpcmega.config import AUTO, RESOLVED_BY_RULE, Config, ModelConfig, check_declared, get_value, named
from hpcmega.errors import ConfigError
from hpcmega.planning.dims import ParallelDims, alternatives, divisors, round_up
from hpcmega.planning.schedule_facts import bubble_fraction
from hpcmega.cluster.sbatch import check_cluster_values, check_text, container_mounts, parse_slurm_time
from hpcmega.schedules import SCHEDULES, names


# -- SLURM time ---------------------------------------------------------------------------------------------------------
# -- checks -------------------------------------------------------------------------------------------------------------
def _check_values(cfg: Config) -> None:
    check_declared(cfg)
    t = cfg.train
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the schedule decays to min_lr, "
                          "so set min_lr <= lr")
    c = cfg.cluster
    check_cluster_values(c)  # nothing that could break out of an #SBATCH line, no managed option
    check_text("logging.run_name", cfg.logging.run_name, extra_forbidden="/%")  # names the default run folder
    if c.mem and not re.fullmatch(r"\d+[KMGT]?", c.mem, re.IGNORECASE):
        raise ConfigError(f"cluster.mem={c.mem!r} is not a SLURM memory size; write e.g. 64G, 64000M or 0 (all)")
    if any(ch.isspace() for ch in c.job_name):
        raise ConfigError(f"cluster.job_name={c.job_name!r} must be a word without spaces (or empty: the run "
                          "folder's name)")
    for key in c.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"cluster.env key {key!r} is not an environment variable name; use letters, digits "
                              "and _ (e.g. NCCL_DEBUG)")
    if any(ch.isspace() for ch in c.container_image) or any(ch.isspace() for m in c.container_mounts for ch in m):
        raise ConfigError("cluster.container_image and cluster.container_mounts must not contain spaces")
    if c.container_image:
        container_mounts(c, cfg.run_dir)
    minutes = parse_slurm_time(c.time)
    if minutes * 60 <= c.signal_grace_s:
        raise ConfigError(f"cluster.time={c.time} ({minutes} min) is not longer than signal_grace_s="
                          f"{c.signal_grace_s}s: the job would be told to stop at once; raise cluster.time "
                          "or lower cluster.signal_grace_s")


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"d_model={m.d_model} is not divisible by n_heads={m.n_heads} (heads share d_model "
                          f"equally); use --d-model {round_up(m.d_model, m.n_heads)} or a --heads dividing "
                          f"{m.d_model}")
    check_seq_len(cfg)
    check_family(m, cfg.parallel.pp)


def check_seq_len(cfg: Config) -> None:
    """A training sequence fits the model (validation, and the engine for a model built without it)."""
    t, m = cfg.train, cfg.model
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"seq_len={t.seq_len} exceeds the model's max_seq_len={m.max_seq_len} (size of the "
                          f"position table); use --seq-len {m.max_seq_len} or less")


def check_family(m: ModelConfig, pp: int) -> None:
    """What each family's block can be built with (hpcmega.models): GPT-2's block has full multi-head attention, a
    4h MLP, an untied head and biases everywhere; llama's grouped-query attention needs whole query groups and RoPE
    an even head size. A head tied to the embedding needs both on one pipeline stage."""
    if m.family == "gpt2":
        llama_only = {"n_kv_heads": m.kv_heads != m.n_heads, "ffn_hidden": m.ffn != 4 * m.d_model,
                      "tie_embeddings": m.tie_embeddings, "qkv_bias": m.qkv_bias, "rope_scaling": m.rope_scaling}
        for key, odd in llama_only.items():
            if odd:
                raise ConfigError(f"model.{key}={getattr(m, key)} is a llama-family setting (GPT-2's block has full "
                                  "multi-head attention, a 4 x d_model MLP, an untied head and biases); use "
                                  f"--family llama, or leave model.{key} unset")
        return
    if m.n_heads % m.kv_heads:
        fits = [d for d in sorted(divisors(m.n_heads), reverse=True) if d <= m.kv_heads]
        raise ConfigError(f"n_kv_heads={m.n_kv_heads} does not divide n_heads={m.n_heads} (each kv head serves a "
                          f"whole group of query heads); use --kv-heads {alternatives(fits)}")
    if m.head_dim % 2:
        raise ConfigError(f"head size d_model/n_heads={m.head_dim} is odd; RoPE rotates pairs of dimensions: use "
                          f"--d-model {round_up(m.d_model, 2 * m.n_heads)}")
    if m.rope_scaling and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                          f"model.rope_low_freq_factor={m.rope_low_freq_factor} (the band RoPE scaling interpolates "
                          "lies between them); e.g. 4 and 1, Llama 3.1's")
    if m.tie_embeddings and pp > 1:
        raise ConfigError(f"model.tie_embeddings needs the embedding and the head on one pipeline stage (pp={pp}); "
                          "use --pp 1 or --no-tie-embeddings")


def _world_fixes(cfg: Config) -> str:
    """The fixes for a world size that tp x pp does not divide, likeliest first: the nodes have more GPUs than
    configured (--gpus-per-node), more nodes, or a smaller tp x pp."""
    c, tp, pp = cfg.cluster, cfg.parallel.tp, cfg.parallel.pp
    fixes = []
    bigger = [g for g in (2, 4, 8) if g > c.gpus_per_node and g % tp == 0 and (c.nodes * g) % (tp * pp) == 0]
    if bigger:
        unit = "tasks" if c.cpu else "GPUs"
        fixes.append(f"if the nodes have {bigger[-1]} {unit}, say so: --gpus-per-node {bigger[-1]}")
    step = (tp * pp) // math.gcd(tp * pp, c.gpus_per_node)
    fixes.append(f"use --nodes {round_up(c.nodes, step)} (a multiple of {step})")
    fixes.append(f"pick tp x pp among {', '.join(map(str, divisors(cfg.world_size)))}")
    return "; or ".join(fixes)


def _check_parallel(cfg: Config) -> None:
    p, c = cfg.parallel, cfg.cluster
    world, tp, pp = cfg.world_size, p.tp, p.pp
    dims = ParallelDims.split(world, tp, pp, ranks=f"the world size {world} (nodes={c.nodes} x gpus_per_node="
                                                   f"{c.gpus_per_node})", fixes=_world_fixes(cfg))
    dp = dims.dp
    if p.dp and p.dp != dp:
        raise ConfigError(f"parallel.dp={p.dp} but world {world} / (tp={tp} x pp={pp}) = {dp}; drop --dp "
                          f"(it is derived) or use --dp {dp}")
    domain = c.gpus_per_node * c.nvlink_domain_nodes
    if domain % tp:
        fits = alternatives(sorted(divisors(domain), reverse=True))
        if c.nvlink_domain_nodes == 1:
            raise ConfigError(f"tp={tp} does not divide gpus_per_node={c.gpus_per_node}: a TP group would cross "
                              f"a node; use --tp {fits}")
        raise ConfigError(f"tp={tp} does not divide the NVLink domain of {c.nvlink_domain_nodes} nodes x "
                          f"{c.gpus_per_node} GPUs = {domain}: a TP group would cross the domain; use --tp {fits}")
    dims.check_model(cfg)
    dims.check_data_parallel(p.data_parallel)


def _check_pipeline(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    fixed = SCHEDULES[p.schedule].stages_per_rank
    if fixed is not None and fixed > 1 and p.virtual_stages not in (1, fixed):
        raise ConfigError(f"schedule {p.schedule} runs exactly {fixed} stages per pipeline rank (V shape); "
                          f"set --virtual-stages {fixed} (or leave it at 1), not {p.virtual_stages}")
    if fixed == 1 and p.virtual_stages > 1:
        multi = names(stages_per_rank=None)
        raise ConfigError(f"virtual_stages={p.virtual_stages} needs a schedule with several stages per rank; "
                          f"use --schedule {multi[0]} (or {', '.join(multi[1:])}), or --virtual-stages 1")
    spr = cfg.stages_per_rank
    stages = p.pp * spr
    if m.n_layers % stages:
        pps = [d for d in divisors(m.n_layers // spr) if d != p.pp] if m.n_layers % spr == 0 else []
        alt = f" or --pp {alternatives(sorted(pps, reverse=True))}" if pps else ""
        raise ConfigError(f"n_layers={m.n_layers} cannot be split into pp={p.pp} x {spr} stage(s) per rank = "
                          f"{stages} equal pipeline stages; use --layers {round_up(m.n_layers, stages)}{alt}")


def check_batch_split(cfg: Config, dp: int) -> int:
    """The global batch splits into whole microbatches of micro_batch sequences on each of ``dp`` ranks, and an
    explicit parallel.microbatches agrees; -> microbatches per rank (Config.microbatches_for). Validation asks it
    with the configured dp, the trainer with its mesh's."""
    p, t = cfg.parallel, cfg.train
    per_mb = dp * t.micro_batch
    if t.global_batch % per_mb:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by dp={dp} x micro_batch="
                          f"{t.micro_batch} = {per_mb}; use --global-batch {round_up(t.global_batch, per_mb)} "
                          f"(a multiple of {per_mb})")
    derived = t.global_batch // per_mb
    if p.microbatches and p.microbatches != derived:
        raise ConfigError(f"parallel.microbatches={p.microbatches} but global_batch={t.global_batch} / (dp={dp} x "
                          f"micro_batch={t.micro_batch}) = {derived}; drop --microbatches (it is derived) or use "
                          f"--global-batch {p.microbatches * per_mb}")
    return cfg.microbatches_for(dp)


def _check_batch(cfg: Config) -> None:
    p = cfg.parallel
    mb = check_batch_split(cfg, cfg.dp)
    if p.pp == 1:
        return
    per_mb = cfg.dp * cfg.train.micro_batch
    schedule = SCHEDULES[p.schedule]
    need = schedule.min_microbatches(p.pp)
    if mb < need:
        why = f"{p.schedule} needs one microbatch per stage ({schedule.min_microbatches_per_pp} x pp)" \
            if schedule.min_microbatches_per_pp > 1 else "every pipeline stage needs a microbatch in flight"
        raise ConfigError(f"microbatches={mb} < {need} with pp={p.pp}: {why}; use --global-batch {need * per_mb} "
                          f"(microbatches = global_batch / (dp x micro_batch))")
    if schedule.microbatches_multiple_of_pp and mb % p.pp:
        raise ConfigError(f"schedule {p.schedule} needs microbatches ({mb}) to be a multiple of pp={p.pp}; use "
                          f"--global-batch {round_up(mb, p.pp) * per_mb} (microbatches = global_batch / "
                          f"(dp x micro_batch))")


def _warnings(cfg: Config) -> list[str]:
    p, t = cfg.parallel, cfg.train
    out: list[str] = []
    if p.pp > 1 and not SCHEDULES[p.schedule].split_backward:  # zero-bubble: the bound overstates its idle time
        bubble = bubble_fraction(p.schedule, p.pp, cfg.stages_per_rank, cfg.microbatches)
        if bubble > 0.25:
            out.append(f"pipeline bubble ~{bubble:.0%} of each step (pp={p.pp}, {cfg.microbatches} microbatches); "
                       "more microbatches (larger --global-batch or smaller --micro-batch) shrink it")
    if p.schedule == "interleaved-1f1b" and p.virtual_stages == 1 and p.pp > 1:
        out.append("interleaved-1f1b with virtual_stages=1 is plain 1F1B; --virtual-stages 2 shrinks the bubble")
    if t.warmup_steps >= t.steps:
        out.append(f"warmup_steps={t.warmup_steps} >= steps={t.steps}: the learning rate never reaches lr")
    if cfg.cluster.cpu and t.precision == "bf16":
        out.append("bf16 on CPU is slower than fp32; bf16 is meant for GPUs")
    return out


def _check_resolved(cfg: Config) -> None:
    for key in RESOLVED_BY_RULE:
        if get_value(cfg, key) in (0, AUTO):
            raise ConfigError(f"{named(key)} is unset: resolve_defaults() must run before validate(); this is a bug "
                              "in the caller, please report it")


def validate(cfg: Config) -> list[str]:
    """Raise ConfigError (one line, names the fix) for a config that cannot run; return warnings otherwise."""
    _check_resolved(cfg)
    _check_values(cfg)
    _check_model(cfg)
    _check_parallel(cfg)
    _check_pipeline(cfg)
    _check_batch(cfg)
    return _warnings(cfg)

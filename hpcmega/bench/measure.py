"""`hpcmega plan --measure`: run the real engine for one pipeline rank of the full job in this CPU process, on a
fake process group of the full world size, and measure the bytes the estimator predicts. Imports torch (lazily,
from the command); everything it compares against lives in the pure estimator.

How one rank is measured:
- ``hpcmega.parallel.fake_world.init_fake_process_group`` (the one place that touches torch's private fake backend)
  makes this process rank R of a world of W: DeviceMesh, DTensor TP/SP and FSDP2 build exactly as on the real
  rank, with real CPU tensors of the real local shapes; collectives return at once without moving data (values are
  meaningless, sizes are real).
- The rank's model parts come from ``hpcmega.parallel.parallelize.build_model_parts`` and its optimizers from
  ``hpcmega.training.optim``: the code a job runs. pp = 1 uses the engine's own ``GradAccumulation``. With pp > 1 the fake
  group cannot carry pipelining's peer-to-peer metadata, so the rank's forwards and backwards are issued here in the
  order of the configured schedule (the microbatches in flight come from the schedule table), with the FSDP2
  settings ``torch.distributed.pipelining`` uses (no resharding and no gradient sync before the last backward).
- Every CPU allocation and free is recorded by the torch profiler (``profile_memory``): the peak of one training
  step (the second: the first creates AdamW's state), the activations left after the forwards of the busiest
  moment (gathered parameters released first), and each block's own share (bytes its forward leaves allocated).

A model too big for this machine is measured as a scaled copy -- fewer layers (at least one per stage), same
widths, and no more microbatches than the schedule needs to reach its peak -- and the estimate shown next to the
measurement is that of the same scaled copy.
"""
from __future__ import annotations

import copy
import os
import statistics
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from hpcmega.config import Config
from hpcmega.errors import ConfigError
from hpcmega.planning.estimate import GIB, Shape, estimate, stage_json
from hpcmega.planning.schedule_facts import chunks_in_flight

# What a measured rank may use on this machine (real CPU tensors): the scaled copy is sized to fit.
DEFAULT_BUDGET_GIB = 3.0


# One fake world per process (a destroyed and re-created world leaves DTensor with stale group names): this
# process is rank MAX_RANKS of 2 * MAX_RANKS + 1, and each measured job is a (pp, dp, tp) grid of that world.
MAX_RANKS = 4096


def _ensure_world() -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        from hpcmega.parallel.fake_world import init_fake_process_group

        init_fake_process_group(MAX_RANKS, 2 * MAX_RANKS + 1)
    return dist.get_rank()


def _grid_placing(me: int, shape: tuple[int, int, int], pp_rank: int) -> list:
    """A (pp, dp, tp) grid of global ranks with ``me`` at (pp_rank, 0, 0). A process group numbers its members in
    increasing global rank, so along each of this rank's groups the numbers must increase with the coordinate: the
    pp_rank members before it get the ranks just below ``me``, every other position a rank above it. Memory depends
    on the coordinates only, not on the rank numbers."""
    pp, dp, tp = shape
    if pp * dp * tp > MAX_RANKS:
        raise ValueError(f"measuring more than {MAX_RANKS} ranks is not supported")
    above = iter(range(me + 1, me + pp * dp * tp))
    grid = [[[0] * tp for _ in range(dp)] for _ in range(pp)]
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                if d == 0 and t == 0 and p <= pp_rank:
                    grid[p][d][t] = me - (pp_rank - p)
                else:
                    grid[p][d][t] = next(above)
    return grid


# -- scaling ------------------------------------------------------------------------------------------------------
def _microbatches_needed(cfg: Config) -> int:
    """Fewest microbatches per step that still reach the schedule's peak (its warm-up) on every rank."""
    pp, v = cfg.parallel.pp, cfg.stages_per_rank
    if pp == 1:
        return min(cfg.microbatches, 2)  # 2 shows gradient accumulation
    if cfg.parallel.schedule in ("1f1b", "gpipe"):
        return min(cfg.microbatches, pp + 1) if cfg.parallel.schedule == "1f1b" else min(cfg.microbatches, pp)
    return min(cfg.microbatches, 2 * pp) if v > 1 else min(cfg.microbatches, pp)


def scaled_copy(cfg: Config, budget_gib: float = DEFAULT_BUDGET_GIB) -> tuple[Config, str | None]:
    """``cfg`` itself if its worst rank fits ``budget_gib`` of host memory, else a copy with fewer layers (same
    widths) and fewer microbatches, and a sentence saying what was scaled."""
    if estimate(Shape.from_config(cfg)).worst.peak <= budget_gib * GIB:
        return cfg, None
    small = copy.deepcopy(cfg)
    m = _microbatches_needed(cfg)
    small.train.global_batch = m * cfg.dp * cfg.train.micro_batch
    small.parallel.microbatches = 0
    stages = cfg.parallel.pp * cfg.stages_per_rank
    layers = stages
    while layers + stages <= cfg.model.n_layers:
        trial = copy.deepcopy(small)
        trial.model.n_layers = layers + stages
        if estimate(Shape.from_config(trial)).worst.peak > budget_gib * GIB:
            break
        layers += stages
    small.model.n_layers = layers
    if estimate(Shape.from_config(small)).worst.peak > budget_gib * GIB:
        raise ConfigError(f"even {layers} layer(s) and {m} microbatches need more than {budget_gib} GiB on this "
                          "machine; raise --measure-mem-gib or measure a smaller micro-batch or sequence length")
    note = (f"measured a scaled copy: {layers} of {cfg.model.n_layers} layers, same widths, {m} of "
            f"{cfg.microbatches} microbatches (global_batch {small.train.global_batch}); the estimate beside it is "
            "the scaled copy's")
    return small, note


# -- allocation accounting ------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """Allocations (+bytes) and frees (-bytes) recorded by the profiler, with named time ranges."""

    events: list[tuple[int, int]] = field(default_factory=list)  # (time ns, bytes)
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def peak(self) -> int:
        live = top = 0
        for _, nbytes in self.events:
            live += nbytes
            top = max(top, live)
        return top

    def net(self) -> int:
        return sum(n for _, n in self.events)

    def net_within(self, start: int, end: int) -> int:
        return sum(n for t, n in self.events if start <= t <= end)


@contextmanager
def recording() -> Iterator[Trace]:
    from torch.profiler import ProfilerActivity, profile

    trace = Trace()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield trace
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            trace.events.append((e.start_ns(), e.nbytes()))
        elif e.name().startswith("measure:"):
            trace.ranges.setdefault(e.name()[8:], []).append((e.start_ns(), e.end_ns()))
    trace.events.sort()


def _mark_blocks(parts) -> None:
    """Time ranges "measure:block" around every block's forward (outside FSDP's own hooks)."""
    import torch

    def pre(module, _args):
        module._measure_range = torch.autograd.profiler.record_function("measure:block")
        module._measure_range.__enter__()

    def post(module, _args, _out):
        module._measure_range.__exit__(None, None, None)

    for part in parts:
        for block in part.blocks.values():
            block.register_forward_pre_hook(pre, prepend=True)
            block.register_forward_hook(post)


def _local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors by their local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizers):
    for opt in optimizers:
        for state in opt.state.values():
            yield from (v for v in state.values() if hasattr(v, "untyped_storage") and v.dim() > 0)


# -- one step of one rank -------------------------------------------------------------------------------------------
class RankStep:
    """The model parts, optimizers and one training step of pipeline rank ``pp_rank`` (dp and tp coordinate 0)."""

    def __init__(self, cfg: Config, pp_rank: int) -> None:
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        from hpcmega.parallel.parallelize import build_model_parts
        from hpcmega.training.optim import build_optimizer

        self.cfg, self.pp_rank = cfg, pp_rank
        me = _ensure_world()
        grid = _grid_placing(me, (cfg.parallel.pp, cfg.dp, cfg.parallel.tp), pp_rank)
        self.mesh = DeviceMesh("cpu", grid, mesh_dim_names=("pp", "dp", "tp"))
        self.device = torch.device("cpu")
        torch.manual_seed(0)
        self.parts = build_model_parts(cfg, self.mesh, self.device)
        if self.parts.replicated is not None:  # DDP cannot take the fake group's empty all-reduce results
            self.parts.replicated.register_comm_hook(None, _keep_local_bucket)
        self.optimizers = [build_optimizer(part, cfg.train) for part in self.parts.parts]
        self.reshard_after_forward = Shape.from_config(cfg).reshard_after_forward
        self.m = cfg.microbatches
        self.b = cfg.train.global_batch // (cfg.dp * self.m)
        _mark_blocks(self.parts.parts)

    # Inputs a stage would receive: token ids on the first stage, hidden states (sequence-sharded with SP) elsewhere.
    def _input(self, stage: int):
        import torch

        cfg, s = self.cfg, self.cfg.train.seq_len
        if stage == 0:
            return torch.randint(0, cfg.model.vocab_size, (self.b, s))
        seq = s // cfg.parallel.tp if cfg.sequence_parallel else s
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        return torch.randn(self.b, seq, cfg.model.d_model, dtype=dtype, requires_grad=True)

    def _targets(self):
        import torch

        return torch.randint(0, self.cfg.model.vocab_size, (self.b, self.cfg.train.seq_len))

    def _order(self) -> list[tuple[str, int, int]]:
        """("F"|"B", local part index, microbatch) in the order the schedule runs them on this rank."""
        cfg, p, v, m = self.cfg, self.cfg.parallel.pp, len(self.parts.parts), self.m
        if p == 1:
            return [x for j in range(m) for x in (("F", 0, j), ("B", 0, j))]
        if cfg.parallel.schedule == "gpipe":
            return [("F", 0, j) for j in range(m)] + [("B", 0, j) for j in range(m)]
        group = p if m % p == 0 else m
        fwd = [(k, j) for g in range(0, m, group) for k in range(v) for j in range(g, min(g + group, m))]
        bwd = [(k, j) for g in range(0, m, group) for k in reversed(range(v)) for j in range(g, min(g + group, m))]
        warm = chunks_in_flight(cfg.parallel.schedule, p, self.pp_rank, v, m)
        order = [("F", k, j) for k, j in fwd[:warm]]
        for i, (k, j) in enumerate(bwd):
            order.append(("B", k, j))
            if warm + i < len(fwd):
                order.append(("F", *fwd[warm + i]))
        return order

    def warm_order(self) -> list[tuple[str, int, int]]:
        """The forwards before the first backward: the moment the most activations are held."""
        order = self._order()
        first_b = next(i for i, (kind, _, _) in enumerate(order) if kind == "B")
        return order[:first_b] if self.cfg.parallel.pp > 1 else order[:1]

    def run(self, order: list[tuple[str, int, int]], finish: bool = True) -> dict:
        """Issue ``order``; returns the live autograd state (outputs per (part, microbatch)) when not finished."""
        from hpcmega.parallel.pipeline import scaled_loss_fn
        from hpcmega.parallel.loss import loss_context

        loss_fn = scaled_loss_fn(self.m)
        parts, stage_ids = self.parts.parts, self.parts.stage_ids
        last_stage = self.parts.num_stages - 1
        last_backward = {k: i for i, (kind, k, _) in enumerate(order) if kind == "B"}  # per local stage
        live: dict[tuple[int, int], Any] = {}
        with loss_context(self.cfg.parallel.tp):
            for i, (kind, k, j) in enumerate(order):
                part, stage = parts[k], stage_ids[k]
                if kind == "F":
                    out = part(self._input(stage))
                    # Inside a pipeline the stage's output stays referenced until its backward (the forward cache).
                    kept = out if self.cfg.parallel.pp > 1 else None
                    live[(k, j)] = (loss_fn(out, self._targets()), kept) if stage == last_stage else (out, kept)
                    continue
                last = finish and i == last_backward[k]
                if self.parts.fsdp:
                    part.set_is_last_backward(last)
                    part.set_reshard_after_backward(last or self.cfg.parallel.pp == 1)
                    part.set_requires_gradient_sync(last)
                out, _ = live.pop((k, j))
                if stage == last_stage:
                    out.backward()
                else:
                    out.backward(_ones_like(out))
        return live

    def step(self) -> None:
        """One optimizer step as the trainer runs it (forward/backward, replicate grads, clip, AdamW)."""
        from hpcmega.parallel.grad_sync import reduce_partial_grads
        from hpcmega.parallel.pipeline import GradAccumulation
        from hpcmega.training.optim import clip_grad_norm_

        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.cfg.parallel.pp == 1:  # the engine's own runner
            rows = self.b * self.m
            ids = self._targets().repeat(self.m, 1)[:rows]
            GradAccumulation(self.parts, self.m, self.cfg.parallel.tp).run(ids, self._targets().repeat(self.m, 1))
        else:
            self.run(self._order())
        params = list(self.parts.parameters())
        reduce_partial_grads(params)
        clip_grad_norm_(params, self.cfg.train.grad_clip, stage_replicas=self.cfg.dp * self.cfg.parallel.tp)
        for opt in self.optimizers:
            opt.step()

    def fsdp_modules(self):
        from torch.distributed.fsdp import FSDPModule

        return [m for part in self.parts.parts for m in part.modules() if isinstance(m, FSDPModule)]

    def reshard(self) -> None:
        """Release FSDP2's gathered parameters (public API), so what stays allocated is activations."""
        for module in self.fsdp_modules():
            module.reshard()


def _keep_local_bucket(_state, bucket):
    """DDP comm hook for the fake world: the bucket stays this rank's own gradients (same buffers, same memory)."""
    import torch

    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _ones_like(t):
    import torch

    return torch.ones_like(t)


@dataclass
class RankMeasurement:
    stage: int
    params: int
    grads: int
    optimizer: int
    activations: int
    peak: int
    per_layer: int

    def to_json(self) -> dict[str, Any]:
        return stage_json(self)


def measure_rank(cfg: Config, pp_rank: int) -> RankMeasurement:
    """Measure pipeline rank ``pp_rank`` of ``cfg`` in this process (on the fake world, see ``_ensure_world``)."""
    rank = RankStep(cfg, pp_rank)
    params = _local_bytes(rank.parts.parameters())
    rank.step()  # creates AdamW's state
    grads = _local_bytes(p.grad for p in rank.parts.parameters())
    optimizer = _local_bytes(_optimizer_tensors(rank.optimizers))
    for opt in rank.optimizers:
        opt.zero_grad(set_to_none=True)
    for module in rank.fsdp_modules():  # so a block's share excludes its gathered parameters
        module.set_reshard_after_forward(True)
    with recording() as warm:  # activations at the busiest moment
        live = rank.run(rank.warm_order(), finish=False)
        rank.reshard()
    activations = warm.net()
    blocks = [warm.net_within(s, e) for s, e in warm.ranges.get("block", [])]
    per_layer = int(statistics.median(blocks)) if blocks else 0
    del live
    rank.reshard()
    for module in rank.fsdp_modules():
        module.set_reshard_after_forward(rank.reshard_after_forward)
    for opt in rank.optimizers:
        opt.zero_grad(set_to_none=True)
    baseline = params + optimizer
    with recording() as full:
        rank.step()
    peak = baseline + full.peak()
    return RankMeasurement(pp_rank, params, grads, optimizer, activations, peak, per_layer)


def ranks_to_measure(cfg: Config) -> list[int]:
    """The first and last pipeline ranks and the estimated worst one."""
    est = estimate(Shape.from_config(cfg))
    return sorted({0, cfg.parallel.pp - 1, est.worst.stage})


@dataclass
class Measurement:
    cfg: Config  # what was measured: the configuration or its scaled copy
    note: str | None  # what was scaled, if anything
    ranks: list[RankMeasurement]
    estimate: Any  # the estimator's Estimate of ``cfg``


def measure_config(cfg: Config, budget_gib: float = DEFAULT_BUDGET_GIB) -> Measurement:
    """Measure the worst rank(s) of ``cfg`` (or of its scaled copy) next to the estimate of the same config."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    target, note = scaled_copy(cfg, budget_gib)
    results = [measure_rank(target, r) for r in ranks_to_measure(target)]
    return Measurement(target, note, results, estimate(Shape.from_config(target)))


def measure(cfg: Config, budget_gib: float = DEFAULT_BUDGET_GIB) -> dict[str, Any]:
    """The ``measured`` object of `plan --measure --json`: the estimate's memory keys, measured."""
    got = measure_config(cfg, budget_gib)
    results, est, mode = got.ranks, got.estimate, got.cfg.parallel.recompute
    note = got.note
    return {
        "memory": {"stages": [r.to_json() for r in results],
                   "peak_gib": round(max(r.peak for r in results) / GIB, 6)},
        "activation_bytes_per_layer": {mode: max(r.per_layer for r in results)},
        "scaled": note,
        "estimate_of_measured": {
            "stages": [est.ranks[r.stage].to_json() for r in results],
            "activation_bytes_per_layer": {mode: est.per_layer[mode]},
        },
    }

"""`hpcmega plan --measure`: run the real engine for one pipeline rank of the full job, at full size, in this CPU
process, and count the bytes it allocates -- without computing anything. Imports torch (lazily, from the command);
everything it compares against lives in the pure estimator.

How one rank is measured:
- ``hpcmega.parallel.fake_world.init_fake_process_group`` (the one place that touches torch's private fake backend)
  makes this process rank R of a world of W: DeviceMesh, DTensor TP/SP and FSDP2 build exactly as on the real
  rank; collectives return at once without moving data.
- The rank's shards are allocated under ``torch._subclasses.fake_tensor.FakeTensorMode``: tensors with the real
  shapes, dtypes and storage sizes but no storage, so modules, autograd, FSDP2 and AdamW run at full width and
  vocabulary (gpt-7b, tp 8) in seconds and a few hundred MB of host memory. Nothing is scaled down.
- :class:`LiveBytes` is the allocation accounting: every storage an operation creates is counted until it is freed
  (a weak reference fires), FSDP2's ``resize_`` of its unsharded storages included, so ``peak`` is what a caching
  allocator's ``max_memory_allocated`` would report, per rank. The same accounting works on real tensors
  (``fake=False``), which tests/test_planning_measure.py uses to pin fake == real on a small case.
- The model parts come from ``hpcmega.parallel.parallelize.build_model_parts`` and the optimizers from
  ``hpcmega.training.optim``: the code a job runs. pp = 1 uses the engine's own ``GradAccumulation``. With pp > 1 the
  rank's forwards and backwards are issued here in the order of the configured schedule, with the FSDP2 settings
  ``torch.distributed.pipelining`` uses, and the pipeline's own memory is allocated as torch's ``PipelineStage``
  does at the first step (one activation and one gradient receive buffer per microbatch, kept for the whole run;
  ``receive_buffer_bytes`` in the estimator is the same count).
- Microbatches: the step's token ids and receive buffers are allocated for all m microbatches; the schedule is
  run for the fewest microbatches that reach its peak (warm-up, one steady round, cool-down; GPipe: all of them).
  Every later steady round frees what it allocates, so more microbatches repeat the same peak (pinned in
  tests/test_planning_measure.py by measuring both ways).
"""
from __future__ import annotations

import statistics
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hpcmega.config import Config
from hpcmega.planning.estimate import GIB, Shape, estimate, stage_json
from hpcmega.planning.schedule_facts import chunks_in_flight

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


def microbatches_to_run(cfg: Config) -> int:
    """Fewest microbatches whose schedule reaches the same peak as all ``cfg.microbatches`` on every rank: the
    warm-up plus one steady round (GPipe holds every microbatch, so all of them)."""
    pp, v, m, schedule = cfg.parallel.pp, cfg.stages_per_rank, cfg.microbatches, cfg.parallel.schedule
    if pp == 1:
        return min(m, 2)  # 2 shows gradient accumulation
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, pp + 1)
    return min(m, 2 * pp) if v > 1 else min(m, pp)


# -- allocation accounting ------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now (``live``) and at most (``peak``) among the storages it has seen: every
    operation's outputs while active (DTensor ops by the local ops they run), and what :meth:`adopt` is given.

    A storage counts from its creation until it is freed (a weak reference's callback, so frees count at once) and
    at its current size (``UntypedStorage.resize_``, which FSDP2 uses to allocate and free unsharded parameters and
    which no dispatch mode sees, is wrapped while active). Under a ``FakeTensorMode`` only that mode's tensors
    count: DTensor's sharding propagation runs its own fake mode, whose tensors a real rank never allocates.
    """

    def __init__(self, fake_mode=None) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self._sizes: dict[int, int] = {}  # storage identity -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        if self.fake_mode is not None and func is torch.ops._c10d_functional.wait_tensor.default:
            return args[0]  # eager waits in place; the fake kernel would return a copy no rank allocates
        out = func(*args, **(kwargs or {}))
        if not _in_sharding_propagation():
            self.adopt(tree_leaves(out))
        return out

    def adopt(self, tensors) -> None:
        """Count the storages of ``tensors`` (e.g. parameters created before the mode was entered)."""
        from torch.distributed.tensor import DTensor

        for t in tensors:
            if isinstance(t, DTensor):
                t = t.to_local()
            if isinstance(t, torch.Tensor) and self._counts(t):
                self._add(t.untyped_storage())

    def _counts(self, t: torch.Tensor) -> bool:
        if self.fake_mode is None:
            return t.device.type != "meta"
        return getattr(t, "fake_mode", None) is self.fake_mode

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = StorageWeakRef(storage).cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _ref, k=key: self._free(k))
        self._change(storage.nbytes())

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self._change(-self._sizes.pop(key, 0))

    def _change(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        key = StorageWeakRef(storage).cdata
        if key in self._sizes:
            before, self._sizes[key] = self._sizes[key], storage.nbytes()
            self._change(self._sizes[key] - before)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __enter__(self):
        original = self._original_resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            result = original(storage, size)
            self._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)


def _propagation_code():
    """The code of DTensor's sharding propagation that runs an op on fake *global*-shaped tensors to learn its
    output's shape (torch 2.13, private; pinned by tests/test_planning_measure.py at a real vocabulary, where its
    full-vocabulary logits would show as a peak no rank has)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    return ShardingPropagator._propagate_tensor_meta_non_cached.__code__


def _in_sharding_propagation() -> bool:
    code = _propagation_code()
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors by their local shard)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        seen[StorageWeakRef(storage).cdata] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizers):
    for opt in optimizers:
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


# -- one step of one rank -------------------------------------------------------------------------------------------
class RankStep:
    """The model parts, optimizers, pipeline buffers and one training step of pipeline rank ``pp_rank`` (dp and tp
    coordinate 0), on fake tensors unless ``fake`` is False."""

    def __init__(self, cfg: Config, pp_rank: int, fake: bool = True, every_microbatch: bool = False) -> None:
        import contextlib

        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed.device_mesh import DeviceMesh

        from hpcmega.parallel.parallelize import build_model_parts
        from hpcmega.training.optim import build_optimizer

        self.cfg, self.pp_rank = cfg, pp_rank
        me = _ensure_world()
        grid = _grid_placing(me, (cfg.parallel.pp, cfg.dp, cfg.parallel.tp), pp_rank)
        self.mesh = DeviceMesh("cpu", grid, mesh_dim_names=("pp", "dp", "tp"))
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        self.allocation = (lambda: self.fake_mode) if fake else contextlib.nullcontext
        torch.manual_seed(0)
        self.parts = build_model_parts(cfg, self.mesh, torch.device("cpu"), self.allocation, fill=not fake)
        if self.parts.replicated is not None:  # DDP cannot take the fake group's empty all-reduce results
            self.parts.replicated.register_comm_hook(None, _keep_local_bucket)
        self.optimizers = [build_optimizer(part, cfg.train) for part in self.parts.parts]
        self.reshard_after_forward = Shape.from_config(cfg).reshard_after_forward
        self.m = cfg.microbatches
        self.m_run = self.m if every_microbatch else microbatches_to_run(cfg)
        self.b = cfg.train.global_batch // (cfg.dp * self.m)
        self.tracker = LiveBytes(self.fake_mode)
        self.block_bytes: list[int] = []
        self._mark_blocks()

    @contextmanager
    def active(self) -> Iterator[LiveBytes]:
        """Fake tensors (when measuring fake) with the allocation accounting above them."""
        with self.allocation(), self.tracker:
            yield self.tracker

    def _mark_blocks(self) -> None:
        """Each block's forward appends the bytes it leaves allocated to ``block_bytes`` (hooks outside FSDP's own,
        so gathered parameters come and go inside)."""
        start: list[int] = []

        def pre(_module, _args):
            start.append(self.tracker.live)

        def post(_module, _args, _out):
            self.block_bytes.append(self.tracker.live - start.pop())

        for part in self.parts.parts:
            for block in part.blocks.values():
                block.register_forward_pre_hook(pre, prepend=True)
                block.register_forward_hook(post)

    def allocate_step_tensors(self) -> None:
        """What the step holds besides the model: the token ids (inputs on the first stage, targets on the last)
        and, with pp > 1, the receive buffers torch's ``PipelineStage`` allocates at the first step and keeps: per
        microbatch an activation (every stage but the first) and a gradient (every stage but the last)."""
        cfg, s = self.cfg, self.cfg.train.seq_len
        rows = self.m * self.b
        self.ids = torch.randint(0, cfg.model.vocab_size, (rows, s)) if self.parts.has_first_stage else None
        self.targets = torch.randint(0, cfg.model.vocab_size, (rows, s)) if self.parts.has_last_stage else None
        self.act_recv: dict[int, list] = {}
        self.grad_recv: dict[int, list] = {}
        if cfg.parallel.pp == 1:
            return
        seq = s // cfg.parallel.tp if cfg.sequence_parallel else s
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        boundary = (self.b, seq, cfg.model.d_model)
        for k, stage in enumerate(self.parts.stage_ids):
            if stage > 0:
                self.act_recv[k] = [torch.empty(boundary, dtype=dtype) for _ in range(self.m)]
            if stage < self.parts.num_stages - 1:
                self.grad_recv[k] = [torch.empty(boundary, dtype=dtype) for _ in range(self.m)]

    def _input(self, k: int, j: int):
        """Microbatch ``j``'s input to local stage ``k``: token ids, or the receive buffer (as torch's stage does)."""
        if self.parts.stage_ids[k] == 0:
            return self.ids[j * self.b:(j + 1) * self.b]
        return self.act_recv[k][j].detach().requires_grad_(True)

    def _order(self) -> list[tuple[str, int, int]]:
        """("F"|"B", local part index, microbatch) in the order the schedule runs them on this rank."""
        cfg, p, v, m = self.cfg, self.cfg.parallel.pp, len(self.parts.parts), self.m_run
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
                    # autocast under replicate + bf16 (the bare part: a DDP forward would wait for a backward)
                    with self.parts.compute_context():
                        out = part(self._input(k, j))
                        # Inside a pipeline the stage's output (the logits too) stays cached until its backward.
                        kept = out if self.cfg.parallel.pp > 1 else None
                        if stage == last_stage:
                            out = loss_fn(out, self.targets[j * self.b:(j + 1) * self.b])
                    live[(k, j)] = (out, kept)
                    continue
                last = finish and i == last_backward[k]
                if self.parts.fsdp:
                    part.set_is_last_backward(last)
                    part.set_reshard_after_backward(last)
                    part.set_requires_gradient_sync(last)
                out, _ = live.pop((k, j))
                out.backward() if stage == last_stage else out.backward(self.grad_recv[k][j])
        return live

    def step(self) -> None:
        """One optimizer step as the trainer runs it (forward/backward, replicate grads, clip, AdamW)."""
        from hpcmega.parallel.grad_sync import reduce_partial_grads
        from hpcmega.parallel.pipeline import GradAccumulation
        from hpcmega.training.optim import clip_grad_norm_

        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.cfg.parallel.pp == 1:  # the engine's own runner
            rows = self.b * self.m_run
            GradAccumulation(self.parts, self.m_run, self.cfg.parallel.tp).run(self.ids[:rows], self.targets[:rows])
        else:
            self.run(self._order())
        params = list(self.parts.parameters())
        reduce_partial_grads(params)
        clip_grad_norm_(params, self.cfg.train.grad_clip, stage_replicas=self.cfg.dp * self.cfg.parallel.tp)
        for opt in self.optimizers:
            opt.step()

    def create_optimizer_state(self) -> None:
        """AdamW's moments exist from the first step on: create them with one step on zero gradients."""
        for p in self.parts.parameters():
            p.grad = torch.zeros_like(p)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def fsdp_modules(self):
        from torch.distributed.fsdp import FSDPModule

        return [m for part in self.parts.parts for m in part.modules() if isinstance(m, FSDPModule)]

    def set_reshard_after_forward(self, value: bool) -> None:
        for module in self.fsdp_modules():
            module.set_reshard_after_forward(value)

    def reshard(self) -> None:
        """Release FSDP2's gathered parameters (public API), so what stays allocated is activations."""
        for module in self.fsdp_modules():
            module.reshard()


def _keep_local_bucket(_state, bucket):
    """DDP comm hook for the fake world: the bucket stays this rank's own gradients (same buffers, same memory)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


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


def measure_rank(cfg: Config, pp_rank: int, fake: bool = True, every_microbatch: bool = False) -> RankMeasurement:
    """Measure pipeline rank ``pp_rank`` of ``cfg`` in this process (on the fake world, see ``_ensure_world``);
    ``fake=False`` allocates and computes real tensors, ``every_microbatch`` runs all m microbatches (both only to
    check that the defaults measure the same bytes)."""
    rank = RankStep(cfg, pp_rank, fake, every_microbatch)
    with rank.active() as tracker:
        tracker.adopt(rank.parts.parameters())
        params = _local_bytes(rank.parts.parameters())
        rank.create_optimizer_state()
        optimizer = _local_bytes(_optimizer_tensors(rank.optimizers))
        rank.allocate_step_tensors()
        # Activations at the busiest moment: the warm-up forwards, gathered parameters released.
        rank.set_reshard_after_forward(True)
        before = tracker.live
        live = rank.run(rank.warm_order(), finish=False)
        rank.reshard()
        activations = tracker.live - before
        per_layer = int(statistics.median(rank.block_bytes)) if rank.block_bytes else 0
        del live
        rank.reshard()
        rank.set_reshard_after_forward(rank.reshard_after_forward)
        tracker.reset_peak()
        rank.step()
        peak = tracker.peak
        grads = _local_bytes(p.grad for p in rank.parts.parameters())
    return RankMeasurement(pp_rank, params, grads, optimizer, activations, peak, per_layer)


def ranks_to_measure(cfg: Config) -> list[int]:
    """The first and last pipeline ranks and the estimated worst one."""
    est = estimate(Shape.from_config(cfg))
    return sorted({0, cfg.parallel.pp - 1, est.worst.stage})


@dataclass
class Measurement:
    cfg: Config
    ranks: list[RankMeasurement]
    estimate: Any  # the estimator's Estimate of ``cfg``


def measure_config(cfg: Config, fake: bool = True) -> Measurement:
    """Measure the first, last and estimated worst ranks of ``cfg`` next to its estimate."""
    results = [measure_rank(cfg, r, fake) for r in ranks_to_measure(cfg)]
    return Measurement(cfg, results, estimate(Shape.from_config(cfg)))


def measure(cfg: Config) -> dict[str, Any]:
    """The ``measured`` object of `plan --measure --json`: the estimate's memory keys, measured."""
    got = measure_config(cfg)
    results, est, mode = got.ranks, got.estimate, cfg.parallel.recompute
    return {
        "memory": {"stages": [r.to_json() for r in results],
                   "peak_gib": round(max(r.peak for r in results) / GIB, 6)},
        "activation_bytes_per_layer": {mode: max(r.per_layer for r in results)},
        "microbatches_run": microbatches_to_run(cfg),
        "estimate_of_measured": {
            "stages": [est.ranks[r.stage].to_json() for r in results],
            "activation_bytes_per_layer": {mode: est.per_layer[mode]},
        },
    }

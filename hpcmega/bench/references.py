"""The reference rows of `hpcmega bench`, written without hpcmega's engine: hand-written explicit TP
(:mod:`hpcmega.bench.explicit_tp`) and plain ``DistributedDataParallel``. Same model, weights, batch shapes,
optimizer (AdamW, foreach) and grad-norm clipping as an hpcmega step, so the ratios compare the parallel machinery
only. Each runs in fresh gloo processes, one thread each, like a local hpcmega job.
"""
from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpcmega.config import Config
from hpcmega.cluster.launcher import free_port
from hpcmega.models.common import build_model, cross_entropy
from hpcmega.training.optim import build_optimizer


def synthetic_batch(cfg: Config, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: random token ids, identical on every rank."""
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.train.seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _timed_steps(cfg: Config, steps: int, step_fn: Callable[[int], None]) -> list[float]:
    times = []
    for step in range(steps):
        start = time.perf_counter()
        step_fn(step)
        times.append(time.perf_counter() - start)
    return times


def explicit_tp_times(cfg: Config, steps: int) -> list[float]:
    return _timed_steps(cfg, steps, explicit_tp_step(cfg))


def explicit_tp_step(cfg: Config) -> Callable[[int], None]:
    """The explicit-TP reference's training step ``step_fn(step)`` on this rank (the process group is tp)."""
    from hpcmega.bench.explicit_tp import ExplicitTPGPT, clip_grad_norm_explicit

    model = ExplicitTPGPT(build_model(cfg.model, cfg.train.seed), dist.group.WORLD)
    opt = build_optimizer(model, cfg.train)
    m = cfg.train.global_batch // cfg.train.micro_batch

    def step_fn(step: int) -> None:
        opt.zero_grad(set_to_none=True)
        inputs, targets = synthetic_batch(cfg, step)
        for x, y in zip(inputs.chunk(m), targets.chunk(m)):
            (model.loss(x, y) / m).backward()
        clip_grad_norm_explicit(model, cfg.train.grad_clip)
        opt.step()

    return step_fn


def ddp_times(cfg: Config, steps: int) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(build_model(cfg.model, cfg.train.seed))
    opt = build_optimizer(model.module, cfg.train)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = cfg.train.global_batch // world
    m = max(1, rows // cfg.train.micro_batch)

    def step_fn(step: int) -> None:
        opt.zero_grad(set_to_none=True)
        inputs, targets = synthetic_batch(cfg, step)
        inputs, targets = inputs[rank * rows : (rank + 1) * rows], targets[rank * rows : (rank + 1) * rows]
        for i, (x, y) in enumerate(zip(inputs.chunk(m), targets.chunk(m))):
            if i < m - 1:
                with model.no_sync():
                    (cross_entropy(model(x), y) / m).backward()
            else:
                (cross_entropy(model(x), y) / m).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        opt.step()

    return _timed_steps(cfg, steps, step_fn)


REFERENCES: dict[str, Callable[[Config, int], list[float]]] = {"explicit-tp": explicit_tp_times, "ddp": ddp_times}


def _worker(rank: int, world: int, port: int, out_dir: str, kind: str, cfg: Config, steps: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        times = REFERENCES[kind](cfg, steps)
        if rank == 0:
            torch.save(times, os.path.join(out_dir, "times.pt"))
    finally:
        dist.destroy_process_group()


def run_reference(kind: str, cfg: Config, nproc: int, steps: int) -> list[Any]:
    """Step times (seconds) of reference ``kind`` on ``nproc`` fresh gloo processes, measured on rank 0."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(nproc, port, out_dir, kind, cfg, steps), nprocs=nproc, join=True,
                           start_method="spawn")
        return torch.load(os.path.join(out_dir, "times.pt"))

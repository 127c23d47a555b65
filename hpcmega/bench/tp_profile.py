"""Where a tp=2 step's time goes, hpcmega next to explicit TP: ``python -m hpcmega.bench.tp_profile``.

Runs the bench model (:data:`hpcmega.bench.cases.MODEL`, the ``tp=2`` case) on two local gloo processes (one
thread each): first the hand-written explicit-TP reference step (:mod:`hpcmega.bench.references`), then the real
engine's ``Trainer.train_step``. Per rank and step it reports CPU time (``time.thread_time``: on a shared machine
wall time mostly measures the neighbours, CPU time still measures the work) and wall time, and, from
``torch.profiler`` over one step on rank 0, how many times the step entered the things that cost CPU beyond the
math: DTensor dispatches (``PythonSubclass``), redistributions, matmul dispatches (a matmul on a DTensor counts
twice: the DTensor op and the local one) and collectives.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any, Callable

COUNTED = {
    "dtensor_dispatch": ("PythonSubclass",),
    "redistribute": ("Redistribute", "NestedRedistribute"),
    "matmul_dispatch": ("aten::mm", "aten::addmm", "aten::bmm"),
    "collective": ("c10d::allreduce_", "c10d::allgather_", "c10d::allgather_into_tensor_coalesced_",
                   "c10d::reduce_scatter_tensor_coalesced_", "c10d::_allgather_base_", "c10d::_reduce_scatter_base_"),
}


def _measure(step_fn: Callable[[int], Any], steps: int, warmup: int, profile_ops: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    cpu, wall = [], []
    for i in range(warmup + steps):
        dist.barrier()
        w, c = time.perf_counter(), time.thread_time()
        step_fn(i)
        if i >= warmup:
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - w)
    counts = {}
    if profile_ops:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step_fn(warmup + steps)
        by_key = {e.key: e.count for e in prof.key_averages()}
        counts = {what: sum(by_key.get(k, 0) for k in keys) for what, keys in COUNTED.items()}
    else:
        step_fn(warmup + steps)  # the other rank's profiled step needs its partner
    return {"cpu_s": cpu, "wall_s": wall, "counts": counts}


def _rank(rank: int, port: int, steps: int, warmup: int, model: dict[str, Any], out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from hpcmega.bench.cases import default_cases
    from hpcmega.bench.references import explicit_tp_step
    from hpcmega.bench.runner import case_config
    from hpcmega.training.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    try:
        (case,) = [c for c in default_cases() if c.name.startswith("tp=2 (")]
        cfg = case_config(replace(case, overrides={**case.overrides, **model}), warmup + steps + 1)
        out = {"explicit TP": _measure(explicit_tp_step(cfg), steps, warmup, rank == 0)}
        trainer = Trainer(cfg, DeviceMesh("cpu", [[[0, 1]]], mesh_dim_names=("pp", "dp", "tp")),
                          tempfile.mkdtemp(dir=out_dir))
        out["hpcmega tp=2"] = _measure(lambda _i: trainer.train_step(), steps, warmup, rank == 0)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def profile(steps: int = 3, warmup: int = 2, model: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per rank: {"explicit TP" | "hpcmega tp=2": {cpu_s: [...], wall_s: [...], counts: {...} (rank 0 only)}};
    ``model``: overrides of the bench model (tests use a tiny one)."""
    import torch.multiprocessing as mp

    from hpcmega.cluster.launcher import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(free_port(), steps, warmup, model or {}, out_dir), nprocs=2, join=True,
                           start_method="spawn")
        return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


def report(ranks: list[dict[str, Any]]) -> str:
    """Per variant: median CPU and wall ms per step on each rank, the CPU ratio to explicit TP, rank 0's counts."""
    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    ref = sum(median(r["explicit TP"]["cpu_s"]) for r in ranks)
    lines = []
    for variant in ranks[0]:
        cpu = [median(r[variant]["cpu_s"]) for r in ranks]
        wall = [median(r[variant]["wall_s"]) for r in ranks]
        counts = ", ".join(f"{k} {v}" for k, v in ranks[0][variant]["counts"].items())
        lines.append(f"{variant}: CPU ms/step {' / '.join(f'{1e3 * c:.0f}' for c in cpu)} (x{sum(cpu) / ref:.2f} "
                     f"explicit), wall {' / '.join(f'{1e3 * w:.0f}' for w in wall)} | {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    ranks = profile(args.steps, args.warmup)
    print(json.dumps(ranks, indent=1) if args.json else report(ranks))


if __name__ == "__main__":
    main()

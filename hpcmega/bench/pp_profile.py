"""Where a pipeline-parallel step's time goes, per rank: ``python -m hpcmega.bench.pp_profile --schedule zbv``.

Runs the bench model (:data:`hpcmega.bench.cases.MODEL`) at pp=2 on two local gloo processes (one thread each) and
times, around the real engine's ``Trainer._step``, the stage's forward, full backward, input-backward and
weight-backward calls (public ``PipelineStage`` methods), the optimizer steps, the rest of the schedule (P2P posts and
waits, loss, bookkeeping) and the rest of the step (clipping, loss all-reduce). Each part is reported as wall time
*and* this rank's CPU time (``time.thread_time``): on a shared machine wall time mostly measures the neighbours, while
CPU time still says how much work each part is; waiting (bubble, P2P) shows as wall time without CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any, Callable

PARTS = ("forward", "backward", "backward_input", "backward_weight", "schedule_rest", "optimizer", "step_rest")


class _Clock:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def wrap(self, part: Callable[[tuple, dict], str] | str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                name = part(args, kwargs) if callable(part) else part
                self.wall[name] += time.perf_counter() - w
                self.cpu[name] += time.thread_time() - c
                self.calls[name] += 1
        return timed


def _instrument(trainer, clock: _Clock) -> None:
    for stage in trainer.runner.stages:
        stage.forward_one_chunk = clock.wrap("forward", stage.forward_one_chunk)
        stage.backward_one_chunk = clock.wrap(
            lambda a, k: "backward" if k.get("full_backward", True) else "backward_input", stage.backward_one_chunk)
        stage.backward_weight_one_chunk = clock.wrap("backward_weight", stage.backward_weight_one_chunk)
    trainer.runner.run = clock.wrap("schedule", trainer.runner.run)
    for opt in trainer.optimizers:
        opt.step = clock.wrap("optimizer", opt.step)


def _breakdown(clock: _Clock, wall: float, cpu: float) -> dict[str, Any]:
    """Per part: wall s, CPU s, calls; the schedule's and the step's remainders are derived, never double counted."""
    compute = ("forward", "backward", "backward_input", "backward_weight")
    rest = {"schedule_rest": ("schedule", compute), "step_rest": (None, ("schedule", "optimizer"))}
    out: dict[str, Any] = {"step": {"wall": wall, "cpu": cpu}}
    for part in PARTS:
        if part in rest:
            whole, inner = rest[part]
            w = (clock.wall[whole] if whole else wall) - sum(clock.wall[p] for p in inner)
            c = (clock.cpu[whole] if whole else cpu) - sum(clock.cpu[p] for p in inner)
            out[part] = {"wall": w, "cpu": c, "calls": 1}
        elif clock.calls[part]:
            out[part] = {"wall": clock.wall[part], "cpu": clock.cpu[part], "calls": clock.calls[part]}
    return out


def _rank(rank: int, port: int, overrides: dict[str, Any], steps: int, warmup: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from hpcmega.bench.cases import BenchCase
    from hpcmega.bench.runner import case_config
    from hpcmega.training.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=600))
    try:
        cfg = case_config(BenchCase("pp profile", 2, overrides), steps + warmup)
        trainer = Trainer(cfg, DeviceMesh("cpu", [[[0]], [[1]]], mesh_dim_names=("pp", "dp", "tp")),
                          tempfile.mkdtemp(dir=out_dir))
        clock = _Clock()
        _instrument(trainer, clock)
        records = []
        for i in range(steps + warmup):
            clock.reset()
            dist.barrier()
            wall, cpu = time.perf_counter(), time.thread_time()
            trainer.train_step()
            if i >= warmup:
                records.append(_breakdown(clock, time.perf_counter() - wall, time.thread_time() - cpu))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(records, f)
    finally:
        dist.destroy_process_group()


def check_config(overrides: dict[str, Any]) -> None:
    """Raise ConfigError (one line naming the fix) before any process starts."""
    from hpcmega.bench.cases import BenchCase
    from hpcmega.bench.runner import case_config
    from hpcmega.planning.validate import validate

    validate(case_config(BenchCase("pp profile", 2, overrides), 1))


def profile(schedule: str, microbatches: int, steps: int = 2, warmup: int = 1, v: int = 2,
            model: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
    """Per rank, per measured step: {part: {wall, cpu, calls}} (see :data:`PARTS`; ``step`` = the whole step)."""
    import torch.multiprocessing as mp

    from hpcmega.bench.cases import MODEL
    from hpcmega.cluster.launcher import free_port
    from hpcmega.schedules import SCHEDULES

    model = {**MODEL, **(model or {})}
    overrides = {**model, "train.global_batch": microbatches * model["train.micro_batch"], "parallel.pp": 2,
                 "parallel.schedule": schedule}
    if SCHEDULES[schedule].multi_stage:
        overrides["parallel.virtual_stages"] = v
    check_config(overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(free_port(), overrides, steps, warmup, out_dir), nprocs=2, join=True,
                           start_method="spawn")
        return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(2)]


def report(ranks: list[list[dict[str, Any]]]) -> str:
    """One line per rank: CPU share of each part (calls), and the share of wall time spent off CPU -- on a quiet
    machine that is the bubble plus P2P waits; on a loaded one it also counts time other processes had the core."""
    lines = []
    for r, steps in enumerate(ranks):
        cpu = sum(s["step"]["cpu"] for s in steps)
        wall = sum(s["step"]["wall"] for s in steps)
        parts = [f"{p} {100 * sum(s[p]['cpu'] for s in steps) / cpu:.1f}% ({steps[0][p]['calls']})"
                 for p in PARTS if p in steps[0]]
        lines.append(f"rank {r}: CPU {cpu / len(steps):.2f} s/step, wall {wall / len(steps):.2f} s/step, "
                     f"off CPU {100 * (1 - cpu / wall):.0f}% of wall (waiting, or descheduled by other load) | " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from hpcmega.schedules import SCHEDULES

    parser.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from hpcmega.errors import ConfigError

    try:
        ranks = profile(args.schedule, args.microbatches, args.steps, args.warmup)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(ranks, indent=1) if args.json else report(ranks))


if __name__ == "__main__":
    main()

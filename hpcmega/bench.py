"""`hpcmega bench`: step time of fixed parallel layouts on this machine, as ratios to a single-process run of the
same global batch measured in the same invocation (this machine is noisy: ratios and medians, not absolutes).

Each configuration runs as a real local job (`hpcmega.launcher`, gloo on CPU, one thread per rank) for a few
steps; its step time is the median of ``metrics.jsonl``'s ``step_time_s`` after the warm-up steps. Configurations
and goals come from the engine issue: d_model 512, seq 256, micro-batch 4, 4 layers, 2 processes x 1 thread.
"""
from __future__ import annotations

import io
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = {"model.d_model": 512, "model.n_heads": 8, "model.n_layers": 4, "model.vocab_size": 512,
         "model.max_seq_len": 256, "train.seq_len": 256, "train.micro_batch": 4}


@dataclass(frozen=True)
class BenchCase:
    name: str
    nproc: int
    overrides: dict[str, Any]
    goal: float | None = None  # step time / baseline step time must be <= goal
    baseline: str | None = None  # name of the single-process case with the same global batch


def default_cases() -> list[BenchCase]:
    return [
        BenchCase("single B=4", 1, {"train.global_batch": 4}),
        BenchCase("tp=2 (DTensor TP+SP)", 2, {"train.global_batch": 4, "parallel.tp": 2}, 0.66, "single B=4"),
        BenchCase("tp=2 compiled", 2, {"train.global_batch": 4, "parallel.tp": 2, "parallel.compile": True},
                  0.66, "single B=4"),
        BenchCase("single B=8", 1, {"train.global_batch": 8}),
        BenchCase("dp=2 (FSDP2)", 2, {"train.global_batch": 8}, 0.55, "single B=8"),
        BenchCase("single B=32", 1, {"train.global_batch": 32}),
        BenchCase("pp=2 1f1b m=8", 2, {"train.global_batch": 32, "parallel.pp": 2, "parallel.schedule": "1f1b"},
                  0.62, "single B=32"),
    ]


def run_case(case: BenchCase, steps: int, warmup: int, workdir: Path) -> list[float]:
    """Run one configuration as a local job; returns the step times after warm-up (seconds)."""
    from hpcmega.config import load_config
    from hpcmega.launcher import launch_local, local_config

    overrides = {**MODEL, **case.overrides, "train.steps": steps + warmup, "train.warmup_steps": 1,
                 "logging.wandb": "disabled", "checkpoint.resume": "none"}
    cfg = local_config(load_config(None, overrides), case.nproc, cpu=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=workdir))
    status = launch_local(cfg, case.nproc, run_dir, out=io.StringIO())
    if status != 0:
        raise RuntimeError(f"bench case {case.name!r} failed; logs in {run_dir / 'logs'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records[warmup:]]


def run_bench(cases: list[BenchCase], steps: int = 3, warmup: int = 2, repeats: int = 1,
              workdir: Path | None = None) -> list[dict[str, Any]]:
    """Run every case ``repeats`` times, interleaved (so slow phases of the machine hit all cases alike)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="hpcmega-bench-"))
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(repeats):
        for case in cases:
            times[case.name] += run_case(case, steps, warmup, workdir)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for case in cases:
        tokens = case.overrides["train.global_batch"] * MODEL["train.seq_len"]
        ms = medians[case.name] * 1e3
        ratio = medians[case.name] / medians[case.baseline] if case.baseline else None
        rows.append({"name": case.name, "procs": case.nproc, "ms_per_step": ms, "tokens_per_s": tokens / (ms / 1e3),
                     "ratio": ratio, "goal": case.goal,
                     "met": None if case.goal is None else bool(ratio is not None and ratio <= case.goal)})
    return rows

"""Run the cases of :mod:`hpcmega.bench.cases` and turn step times into ratios a skeptic can check.

Every case runs ``repeats`` times, interleaved (case 1, 2, ..., then again), so a slow phase of a shared machine
hits all cases alike; a case's ``min/median/max`` are over all its measured steps (after ``warmup`` steps of each
run), and ratios are of medians measured in the same invocation. hpcmega cases run as real local jobs
(``hpcmega.cluster.launcher``, gloo on CPU, one thread per rank) and report ``metrics.jsonl``'s ``step_time_s``; the
reference cases (explicit TP, DDP) run in :mod:`hpcmega.bench.references` and time the same step on rank 0.
"""
from __future__ import annotations

import io
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from hpcmega.bench.cases import MODEL, BenchCase
from hpcmega.config import Config


def case_config(case: BenchCase, steps: int, **extra: Any) -> Config:
    from hpcmega.config import load_config
    from hpcmega.cluster.launcher import local_config

    overrides = {**MODEL, **case.overrides, "train.steps": steps, "train.warmup_steps": 1,
                 "logging.wandb": "disabled", "checkpoint.resume": "none", "train.data": "synthetic", **extra}
    return local_config(load_config(None, overrides), case.nproc, cpu=True)


def run_job(cfg: Config, nproc: int, name: str, workdir: Path) -> list[dict[str, Any]]:
    """One local hpcmega job; its metrics.jsonl records."""
    from hpcmega.cluster.launcher import launch_local
    from hpcmega.runs.files import RunFolder

    run_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=workdir))
    if launch_local(RunFolder(run_dir).bind(cfg), nproc, out=io.StringIO()) != 0:
        raise RuntimeError(f"bench case {name!r} failed; logs in {run_dir / 'logs'}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_case(case: BenchCase, steps: int, warmup: int, workdir: Path) -> list[float]:
    """Step times after warm-up (seconds) of one run of ``case``."""
    cfg = case_config(case, steps + warmup)
    if case.kind == "job":
        times = [r["step_time_s"] for r in run_job(cfg, case.nproc, case.name, workdir)]
    else:
        from hpcmega.bench.references import run_reference

        times = run_reference(case.kind, cfg, case.nproc, steps + warmup)
    return times[warmup:]


def run_bench(cases: list[BenchCase], steps: int = 3, warmup: int = 2, repeats: int = 1,
              workdir: Path | None = None) -> list[dict[str, Any]]:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="hpcmega-bench-"))
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(repeats):
        for case in cases:
            times[case.name] += run_case(case, steps, warmup, workdir)
    return rows_from_times(cases, times)


def rows_from_times(cases: list[BenchCase], times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The report: per case min/median/max ms, tokens/s at the median, ratio to its baseline and goal verdict."""
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = {c.name: median[c.name] / median[c.baseline] if c.baseline else None for c in cases}
    rows = []
    for case in cases:
        goal = case.goal
        if goal is not None and case.goal_ref:
            goal = goal * ratio[case.goal_ref]
        r = ratio[case.name]
        ts = times[case.name]
        rows.append({
            "name": case.name, "kind": case.kind, "procs": case.nproc, "steps": len(ts),
            "ms_min": min(ts) * 1e3, "ms_median": median[case.name] * 1e3, "ms_max": max(ts) * 1e3,
            "tokens_per_s": case.global_batch * MODEL["train.seq_len"] / median[case.name],
            "ratio": r, "goal": goal, "goal_ref": case.goal_ref,
            "met": None if goal is None else bool(r is not None and r <= goal),
        })
    return rows


def baseline_disagreement(rows: list[dict[str, Any]]) -> float:
    """How far apart the single-process baselines' tokens/s are (max / min - 1). They do the same work per token
    (same micro-batch, only the number of accumulated microbatches differs; the optimizer is < 5% of a step), so a
    large spread means one of them ran in a slow phase and every ratio dividing by it is off by that much."""
    rates = [r["tokens_per_s"] for r in rows if r["procs"] == 1 and r["ratio"] is None and r["kind"] == "job"]
    return max(rates) / min(rates) - 1.0 if len(rates) > 1 else 0.0


def run_comm(cases: list[BenchCase], workdir: Path | None = None) -> list[dict[str, Any]]:
    """`--comm`: one recorded step (after one unrecorded) per case; measured bytes per dimension vs the planner."""
    from hpcmega.planning.estimate import Shape, comm_bytes_per_step

    workdir = workdir or Path(tempfile.mkdtemp(prefix="hpcmega-bench-comm-"))
    rows = []
    for case in cases:
        cfg = case_config(case, 2, **{"logging.comm_stats": True})
        record = run_job(cfg, case.nproc, case.name, workdir)[-1]
        planned = comm_bytes_per_step(Shape.from_config(cfg))
        measured = record["comm_bytes"]
        rows.append({
            "name": case.name, "procs": case.nproc, "measured_bytes": measured, "planned_bytes": planned,
            "ratio": {d: measured.get(d, 0) / planned[d] for d in ("tp", "pp", "dp") if planned[d]},
            "collectives": record["comm_ops"],
        })
    return rows

"""What `hpcmega bench` measures: the cases, their baselines and goals. Pure (no torch).

Model (every CPU case): d_model 512, 8 heads, 4 layers, vocab 512, seq 256, micro-batch 4, fp32, AdamW; 2
processes x 1 thread against 1 process x 1 thread on the same global batch. Goals (issue 11): hpcmega's tp=2 within
1.10x of the hand-written explicit-TP ratio (compiled: 1.00x), dp=2 within 1.10x of plain DDP's, pp=2 within 5% of
the ideal ratio 1 / (p (1 - bubble)) of its schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hpcmega.planning.schedule_facts import bubble_fraction

MODEL = {"model.d_model": 512, "model.n_heads": 8, "model.n_layers": 4, "model.vocab_size": 512,
         "model.max_seq_len": 256, "train.seq_len": 256, "train.micro_batch": 4}
KINDS = ("job", "explicit-tp", "ddp")  # an hpcmega local job, or a reference in hpcmega.bench.references


@dataclass(frozen=True)
class BenchCase:
    name: str
    nproc: int
    overrides: dict[str, Any]
    baseline: str | None = None  # the single-process case with the same global batch
    kind: str = "job"
    goal: float | None = None  # ratio <= goal (x the ratio of ``goal_ref`` when set)
    goal_ref: str | None = None
    comm: bool = field(default=False)  # also a `--comm` case

    @property
    def global_batch(self) -> int:
        return self.overrides["train.global_batch"]


def ideal_pp_ratio(pp: int, schedule: str, v: int, m: int) -> float:
    """Step time of p pipeline ranks / one process, if only the bubble were lost: 1 / (p (1 - bubble))."""
    return 1.0 / (pp * (1.0 - bubble_fraction(schedule, pp, v, m)))


def _pp(schedule: str, label: str, v: int, m: int, **goal: Any) -> BenchCase:
    """pp=2 with ``m`` microbatches of 4 rows against one process on the same global batch; the goal is the ideal
    bubble ratio + 5% unless ``goal``/``goal_ref`` say otherwise."""
    over = {"train.global_batch": 4 * m, "parallel.pp": 2, "parallel.schedule": schedule}
    if v > 1:
        over["parallel.virtual_stages"] = v
    goal = goal or {"goal": round(1.05 * ideal_pp_ratio(2, schedule, v, m), 3)}
    return BenchCase(f"pp=2 {label} m={m}", 2, over, f"single B={4 * m}", comm=m == 8, **goal)


def default_cases() -> list[BenchCase]:
    tp = {"train.global_batch": 4, "parallel.tp": 2}
    return [
        BenchCase("single B=4", 1, {"train.global_batch": 4}),
        BenchCase("explicit TP tp=2", 2, {"train.global_batch": 4}, "single B=4", kind="explicit-tp"),
        BenchCase("tp=2 (DTensor TP+SP)", 2, tp, "single B=4", goal=1.10, goal_ref="explicit TP tp=2", comm=True),
        BenchCase("tp=2 compiled", 2, {**tp, "parallel.compile": True}, "single B=4", goal=1.00,
                  goal_ref="explicit TP tp=2"),
        BenchCase("single B=8", 1, {"train.global_batch": 8}),
        BenchCase("DDP dp=2", 2, {"train.global_batch": 8}, "single B=8", kind="ddp"),
        BenchCase("dp=2 (FSDP2)", 2, {"train.global_batch": 8}, "single B=8", goal=1.10, goal_ref="DDP dp=2",
                  comm=True),
        BenchCase("dp=2 (FSDP2, no reshard)", 2, {"train.global_batch": 8, "parallel.reshard_after_forward": False},
                  "single B=8", goal=1.10, goal_ref="DDP dp=2", comm=True),
        BenchCase("dp=2 (replicate)", 2, {"train.global_batch": 8, "parallel.data_parallel": "replicate"},
                  "single B=8", goal=1.10, goal_ref="DDP dp=2", comm=True),
        BenchCase("single B=32", 1, {"train.global_batch": 32}),
        _pp("1f1b", "1f1b", 1, 8),
        _pp("interleaved-1f1b", "interleaved v=2", 2, 8),
        _pp("zbv", "zbv", 2, 8),
        # few microbatches, where the bubble dominates: 1F1B idles 1/3 of a step, zbv's V order (simulated from
        # torch's action list with F = I = W) 1/7, so zbv must beat 1F1B here (goal: by >= 10%; bubbles say 22%)
        _pp("1f1b", "1f1b", 1, 2),
        _pp("zbv", "zbv", 2, 2, goal=0.90, goal_ref="pp=2 1f1b m=2"),
    ]


def comm_cases() -> list[BenchCase]:
    """`hpcmega bench --comm`: the multi-process layouts, plus pp=2 x dp=2 on 4 processes (no timing)."""
    four = BenchCase("pp=2 x dp=2 1f1b", 4, {"train.global_batch": 32, "parallel.pp": 2, "parallel.schedule": "1f1b"},
                     comm=True)
    return [c for c in default_cases() if c.comm] + [four]


def select(cases: list[BenchCase], only: tuple[str, ...]) -> list[BenchCase]:
    """Cases whose name contains one of ``only``, plus the baselines and goal references they need; [] = none."""
    chosen = [c for c in cases if any(o in c.name for o in only)]
    needed = {c.baseline for c in chosen} | {c.goal_ref for c in chosen}
    return [c for c in cases if c in chosen or c.name in needed] if chosen else []

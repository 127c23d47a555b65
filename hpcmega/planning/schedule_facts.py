"""What the planner needs to know about each pipeline schedule, in one place: how many microbatch-chunks of
activations a pipeline rank holds at its peak, and the idle (bubble) fraction of a step. Pure Python.

Counted the way ``torch.distributed.pipelining`` runs them (torch 2.13):
- ``gpipe``: every forward before any backward, so a rank holds all m microbatches.
- ``1f1b``: rank r does min(m, p - r) warm-up forwards, then alternates; it never holds more than that.
- ``interleaved-1f1b`` (v chunks per rank): (v - 1) * mpr + 2 * (p - 1 - r) warm-up chunk-forwards, mpr = the
  microbatches per round (p when m is a multiple of p), plus the one forward before the first backward. For rank 0
  and m a multiple of p that is v*p + p - 1 chunks of L/(v*p) layers: Narayanan et al. (2021)'s
  p * (1 + (p - 1)/(p * v)) microbatches of a whole rank's layers.
- ``zero-bubble`` (interleaved ZB-H1) holds what interleaved-1f1b holds; ``zbv``/``dualpipev`` (two chunks per rank
  in a V) at most 2p chunks on rank 0 -- an upper bound, not a measured count.
Bubble = idle / total = (p - 1) / (v * m + p - 1) (Narayanan 2021 section 2.2), except ``zbv``: replaying torch's
own action lists (``ScheduleZBVZeroBubble``, every rank, forward / input-backward / weight-backward one time unit
each, an action waiting for its cross-stage input) leaves p - 1 idle units per rank when m >= 2p and 2(p - 1) when
m = p, against 6m busy units: (p - 1) / (6m + p - 1), 1/49 at p = 2, m = 8 where the interleaved bound says 1/17
(pinned against torch's lists in tests/test_planning.py). ``zero-bubble`` and ``dualpipev`` keep the interleaved
bound, which over-estimates their idle time.
"""
from __future__ import annotations

from hpcmega.schedules import SCHEDULES


def chunks_in_flight(schedule: str, pp: int, pp_rank: int, v: int, m: int) -> int:
    """Peak number of (microbatch, local stage) activations held by pipeline rank ``pp_rank``."""
    if pp == 1:
        return 1  # plain gradient accumulation: forward then backward, one microbatch at a time
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, pp - pp_rank)
    if SCHEDULES[schedule].v_shape:
        return min(m * 2, 2 * (pp - pp_rank))
    rounds = max(1, m // pp)
    per_round = m // rounds
    warmup = (v - 1) * per_round + 2 * (pp - 1 - pp_rank)
    return min(m * v, warmup + 1)


def bubble_fraction(schedule: str, pp: int, v: int, m: int) -> float:
    """Idle fraction of a step on each rank (see the module docstring)."""
    if pp == 1:
        return 0.0
    if schedule == "zbv":
        idle = (pp - 1) * (1 if m >= 2 * pp else 2)
        return idle / (6 * m + idle)
    chunks = v if SCHEDULES[schedule].multi_stage else 1
    return (pp - 1) / (chunks * m + pp - 1)

"""Every fact about a pipeline schedule, in one table. Pure Python (no torch): config, validation, the planner,
stage building and the docs read it, so adding a schedule is one entry here (plus its torch class existing).

Fields of :class:`Schedule`:

- ``torch_class``: the class name in ``torch.distributed.pipelining`` that runs it (the engine looks it up there).
- ``stages_per_rank``: a fixed count (1; 2 for the V shapes) or ``None`` = ``parallel.virtual_stages``.
- ``v_shape``: rank r owns stages r and 2pp-1-r (so pipeline rank 0 holds the first *and* the last stage);
  otherwise placement is looped: rank r owns r, r+pp, r+2pp, ...
- ``split_backward``: backward is split into an input part and a deferred weight part (zero-bubble family). FSDP2
  must then keep gathered parameters until backward, and ``torch.compile`` cannot be used.
- ``min_microbatches_per_pp``: microbatches per step must be at least this many times pp (1: every stage has one
  in flight; 2 for DualPipeV: one per stage, two stages per rank).
- ``microbatches_multiple_of_pp``: the multi-stage torch schedules need microbatches to be a multiple of pp.

The bubble and peak activations per schedule are computed from these facts in hpcmega.planning.schedule_facts
(the input is the number of stages per rank, v: (p-1)/(v·m + p-1)).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    name: str
    torch_class: str
    stages_per_rank: int | None
    v_shape: bool = False
    split_backward: bool = False
    min_microbatches_per_pp: int = 1
    microbatches_multiple_of_pp: bool = False

    @property
    def multi_stage(self) -> bool:
        """More than one stage per rank is possible (the torch class takes a list of stages)."""
        return self.stages_per_rank != 1

    def stages_on_each_rank(self, virtual_stages: int) -> int:
        return self.stages_per_rank if self.stages_per_rank is not None else max(1, virtual_stages)

    def min_microbatches(self, pp: int) -> int:
        return self.min_microbatches_per_pp * pp


_TABLE = (
    Schedule("gpipe", "ScheduleGPipe", stages_per_rank=1),
    Schedule("1f1b", "Schedule1F1B", stages_per_rank=1),
    Schedule("interleaved-1f1b", "ScheduleInterleaved1F1B", stages_per_rank=None, microbatches_multiple_of_pp=True),
    Schedule("zero-bubble", "ScheduleInterleavedZeroBubble", stages_per_rank=None, split_backward=True,
             microbatches_multiple_of_pp=True),
    Schedule("zbv", "ScheduleZBVZeroBubble", stages_per_rank=2, v_shape=True, split_backward=True,
             microbatches_multiple_of_pp=True),
    Schedule("dualpipev", "ScheduleDualPipeV", stages_per_rank=2, v_shape=True, split_backward=True,
             min_microbatches_per_pp=2, microbatches_multiple_of_pp=True),
)

SCHEDULES: dict[str, Schedule] = {s.name: s for s in _TABLE}
DEFAULT_SCHEDULE = "1f1b"


def names(**facts: object) -> tuple[str, ...]:
    """Names of the schedules whose fields/properties equal ``facts``, e.g. ``names(split_backward=True)``."""
    return tuple(s.name for s in _TABLE if all(getattr(s, k) == v for k, v in facts.items()))

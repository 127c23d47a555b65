"""Which pipeline stages a rank owns and which layers a stage holds. Pure arithmetic, no torch.

Looped placement (most schedules): rank r owns stages r, r + pp, r + 2pp, ...
V-shaped placement (``v_shape`` in :mod:`hpcmega.schedules`: zbv, dualpipev): rank r owns stages r and 2pp - 1 - r,
so rank 0 holds the first *and* the last stage and the loss is computed there.
"""
from __future__ import annotations

from hpcmega.schedules import SCHEDULES


def stage_ids_for_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Global stage indices owned by pipeline rank ``pp_rank``, in increasing order."""
    if SCHEDULES[schedule].v_shape:
        if stages_per_rank != 2:
            raise ValueError(f"{schedule} places exactly 2 stages per rank, got {stages_per_rank}")
        return sorted((pp_rank, 2 * pp - 1 - pp_rank))
    return [pp_rank + v * pp for v in range(stages_per_rank)]


def layers_for_stage(stage: int, num_stages: int, n_layers: int) -> range:
    """Contiguous block indices of ``stage`` (global numbering); stage sizes differ by at most one."""
    if n_layers < num_stages:
        raise ValueError(f"{n_layers} layers cannot fill {num_stages} pipeline stages")
    return range(stage * n_layers // num_stages, (stage + 1) * n_layers // num_stages)

"""Skip an optimizer step whose loss or global gradient norm is not finite; stop after too many in a row.

One overflowing or poisoned batch would otherwise write NaN into every weight and every Adam moment, and all later
steps would be lost. The loss and the gradient norm checked here are the global ones (reduced over every rank), so
all ranks take the same decision at the same step without any extra communication. A skipped step still consumes
its batch and counts as a step (as Megatron does), so the data order and the LR schedule are those of a run
without the bad batch. Pure Python: the decision is tested without torch.
"""
from __future__ import annotations

import math


class NonFiniteStepsError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm; the run stops."""


class StepGuard:
    """``check(step, loss, grad_norm)`` -> apply the optimizer step? Counts ``skipped_steps`` (over the whole run:
    a checkpoint carries ``state_dict()``, so a resumed run goes on counting) and raises
    :class:`NonFiniteStepsError` at ``max_consecutive`` skips in a row, a run of skips across a resume included."""

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """``state`` from a checkpoint's meta.json; one written before the guard was saved restores zeros."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.skipped_steps += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStepsError(
                f"{self.consecutive} consecutive steps up to step {step} had a non-finite loss ({loss}) or gradient "
                f"norm ({grad_norm}) and were skipped; weights are still those after step {step - self.consecutive}. "
                "Lower --lr, check the data, or resume from an earlier checkpoint; "
                "--max-consecutive-skips (train.max_consecutive_skips) sets how many are tolerated"
            )
        return False

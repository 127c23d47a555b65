"""Preemption and time limits: a signal only sets a flag; the ranks agree at a step boundary, save together,
and the job requeues itself.

Why not do the work in the signal handler (as submitit's Checkpointable does)? The signal reaches each rank at a
different moment, in the middle of different collectives; saving from inside a handler would deadlock or write a
checkpoint of half-updated state. A flag plus one all-reduce per step boundary makes every rank stop at the same
step, so the collective save sees one consistent model.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

# SLURM sends this `--signal=USR2@<grace>` seconds before the time limit, and the tests (or an admin) send it with
# `scancel --signal=USR2` to simulate a preemption. SIGTERM is left alone: `scancel` sends it to cancel a job, and a
# cancelled job must not requeue.
STOP_SIGNALS = (signal.SIGUSR2,)


class StopFlag:
    """Set by a signal handler; read at step boundaries. Installing it replaces submitit's USR2 handler."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> "StopFlag":
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.signum = signum  # nothing else: we may be inside a collective

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, group=None) -> bool:
        """True on every rank if any rank received a stop signal (one tiny all-reduce)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool
    reason: str


def decide_requeue(job_id: str | None, restart_count: int, max_requeues: int) -> RequeueDecision:
    """Pure decision, so the policy is testable without SLURM."""
    if not job_id:
        return RequeueDecision(False, "not running under SLURM (local run): saved, stopping")
    if restart_count >= max_requeues:
        return RequeueDecision(
            False, f"requeued {restart_count} times already (max_requeues={max_requeues}): saved, not requeueing"
        )
    return RequeueDecision(True, f"requeueing job {job_id} (attempt {restart_count + 1} of {max_requeues})")


def requeue(job_id: str) -> None:
    """Ask SLURM to requeue this job. SLURM then stops our tasks and queues the same batch script again; the new
    attempt resumes from the checkpoint just written (`--resume auto`)."""
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, text=True, timeout=60)


def slurm_job_id() -> str | None:
    # For array jobs, requeue the array task's own id.
    return os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    ) or os.environ.get("SLURM_JOB_ID")

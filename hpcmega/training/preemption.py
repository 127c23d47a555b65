"""Preemption and time limits: a signal only sets a flag; the ranks agree at a step boundary, save together,
and the job requeues itself.

Why not do the work in the signal handler (as submitit's Checkpointable does)? The signal reaches each rank at a
different moment, in the middle of different collectives; saving from inside a handler would deadlock or write a
checkpoint of half-updated state. A flag plus one all-reduce per step boundary makes every rank stop at the same
step, so the collective save sees one consistent model.
"""
from __future__ import annotations

import logging
import signal
import subprocess
from dataclasses import dataclass

from hpcmega.cluster.process import STOP_SIGNALS

log = logging.getLogger(__name__)


def stop_signals(under_slurm: bool) -> tuple[int, ...]:
    return STOP_SIGNALS if under_slurm else (signal.SIGUSR2,)


class StopFlag:
    """Set by a signal handler; read at step boundaries. Installing it replaces submitit's handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed_signum: int | None = None

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR2,)) -> "StopFlag":
        for sig in signals:
            signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # deliver what arrived during start-up now
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is None or STOP_SIGNALS.index(signum) > STOP_SIGNALS.index(self.signum):
            self.signum = signum  # nothing else: we may be inside a collective

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, group=None) -> bool:
        """True on every rank if any rank received a stop signal (one tiny all-reduce); all ranks then also agree
        on ``agreed_signum`` (the one with the highest precedence)."""
        import torch
        import torch.distributed as dist

        code = STOP_SIGNALS.index(self.signum) + 1 if self.signum is not None else 0
        flag = torch.tensor([code], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend(group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        code = int(flag.item())
        self.agreed_signum = STOP_SIGNALS[code - 1] if code else None
        return bool(code)


@dataclass(frozen=True)
class RequeueDecision:
    requeue: bool  # rank 0 runs `scontrol requeue`
    reason: str
    slurm_ends: bool = False  # SLURM ends this attempt itself (SIGTERM): wait for it instead of exiting


def decide_requeue(job_id: str | None, restart_count: int, max_requeues: int,
                   signum: int = signal.SIGUSR2) -> RequeueDecision:
    """Pure decision, so the policy is testable without SLURM."""
    if not job_id:
        return RequeueDecision(False, "not running under SLURM (local run): saved, stopping")
    if signum == signal.SIGTERM:
        # Exiting now would end a preempted job before its grace time is up, and SLURM would record it as
        # finished instead of requeueing it; so the ranks wait to be ended.
        return RequeueDecision(False, "SIGTERM from SLURM: saved; waiting for SLURM to end this attempt (a "
                                      "preempted job is requeued by SLURM, a cancelled one stays stopped)", True)
    if restart_count >= max_requeues:
        return RequeueDecision(
            False, f"requeued {restart_count} times already (max_requeues={max_requeues}): saved, not requeueing"
        )
    return RequeueDecision(True, f"requeueing job {job_id} (attempt {restart_count + 1} of {max_requeues})")


def requeue(job_id: str) -> None:
    """Ask SLURM to requeue this job. SLURM then stops our tasks and queues the same batch script again; the new
    attempt resumes from the checkpoint just written (`--resume auto`)."""
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, text=True, timeout=60)


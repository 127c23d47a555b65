"""Process lifetime for local ranks: a rank must not outlive the `hpcmega run` that started it.

Ranks run in sessions of their own (so a signal to the launcher's terminal does not hit them half-way through a
collective), which also means nothing ends them if the launcher is killed with SIGKILL. Each rank therefore asks
Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG)``) and checks that its parent is still the launcher (it
may have died before the call). Linux only; elsewhere this is a no-op.

The stop signals live here too: the launcher blocks them while it spawns ranks (the mask is inherited), and each
rank's StopFlag (hpcmega.training.preemption) installs handlers for them and unblocks them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "HPCMEGA_LAUNCHER_PID"


def die_with_launcher() -> None:
    """Called first thing in a local rank: SIGKILL this process when the launcher dies."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher:
        return  # a SLURM task: slurmstepd ends the tasks of a step
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


# USR2: SLURM sends it `--signal=USR2@<grace>` seconds before the time limit (and admins/tests with
# `scancel --signal=USR2`); the job saves and requeues itself. TERM: what SLURM sends on preemption (then SIGKILL
# after the partition's GraceTime) and on `scancel`; under SLURM the job saves and lets SLURM decide -- a preempted
# job (PreemptMode=REQUEUE) is requeued by SLURM, a cancelled one stays stopped. A local rank keeps TERM's default
# (the launcher uses it to end ranks). Listed by precedence: when ranks got different signals, the later one wins.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def block_stop_signals() -> list[int]:
    """Block the stop signals (a process started now inherits the mask): one that arrives before
    :meth:`StopFlag.install` stays pending instead of killing a rank that is still starting up."""
    return sorted(signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS))

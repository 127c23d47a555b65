"""Process lifetime for local ranks: a rank must not outlive the `hpcmega run` that started it.

Ranks run in sessions of their own (so a signal to the launcher's terminal does not hit them half-way through a
collective), which also means nothing ends them if the launcher is killed with SIGKILL. Each rank therefore asks
Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG)``) and checks that its parent is still the launcher (it
may have died before the call). Linux only; elsewhere this is a no-op.
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

"""The multi-process harness itself: a rank killed by a native crash reruns its group once, with a warning that
names the crash; a second crash still fails."""
from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_harness import NativeCrashWarning, spawn


def _crash(marker: str) -> int:
    """Rank 1 dies of SIGSEGV while ``marker`` does not exist (always, with an empty marker name)."""
    if dist.get_rank() == 1 and not (marker and os.path.exists(marker)):
        if marker:
            open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)
    return dist.get_rank()


def test_a_native_crash_reruns_the_group_once_and_says_so(tmp_path):
    with pytest.warns(NativeCrashWarning, match="rank 1 of a 2-rank group died of SIGSEGV"):
        assert spawn(2, _crash, str(tmp_path / "crashed-once")) == [0, 1]


def test_a_second_native_crash_fails(tmp_path):
    with pytest.warns(NativeCrashWarning), pytest.raises(mp.ProcessExitedException, match="SIGSEGV"):
        spawn(2, _crash, "")

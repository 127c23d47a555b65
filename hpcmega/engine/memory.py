"""Peak memory of this rank, for the per-step record (``mem_peak_gib``) and the scale tests.

On a GPU the number is what PyTorch's caching allocator handed out at most (``max_memory_allocated``), the figure
that decides an out-of-memory error; on CPU it is the process's peak resident set (``ru_maxrss``), which also counts
anything materialised during initialisation and the interpreter itself.
"""
from __future__ import annotations

import resource
import sys

import torch

GIB = 2**30


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return peak_rss_bytes() / GIB

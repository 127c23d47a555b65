"""Peak memory of this rank, for the per-step record (``mem_peak_gib``) and the scale tests.

On a GPU the number is what PyTorch's caching allocator handed out at most (``max_memory_allocated``), the figure
that decides an out-of-memory error; on CPU it is the process's peak resident set (``ru_maxrss``), which also counts
anything materialised during initialisation and the interpreter itself.
"""
from __future__ import annotations

import gc
import resource
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

GIB = 2**30


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return peak_rss_bytes() / GIB


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage produced by operations while active and still alive, with the peak.

    Every operation's outputs are recorded by storage (a DTensor by its local shard), with weak references; at
    each later operation, storages that have died are dropped. ``peak`` is the most bytes alive at once, a
    deterministic stand-in for ``torch.cuda.max_memory_allocated`` on CPU (only storages created while active
    count; frees between operations are seen at the next one, so the peak can only be overestimated).
    ``alive(exclude)`` is what is still held now, e.g. what a forward keeps for backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._drop_dead()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for storage in local_storages(t):
                    self._record(storage)
        self.peak = max(self.peak, self.live)
        return out

    def _record(self, storage: torch.UntypedStorage) -> None:
        ptr = storage.data_ptr()
        if ptr and ptr not in self._storages and storage.device.type != "meta":
            self._storages[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.live += storage.nbytes()

    def _drop_dead(self) -> None:
        for ptr in [p for p, (ref, _) in self._storages.items() if ref.expired()]:
            self.live -= self._storages.pop(ptr)[1]

    def alive(self, exclude: set[int] = frozenset()) -> int:
        """Bytes of recorded storages still alive now, except those whose data pointers are in ``exclude``."""
        gc.collect()
        self._drop_dead()
        return sum(n for ptr, (_, n) in self._storages.items() if ptr not in exclude)


def local_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding ``t``'s data on this rank: a wrapper subclass (DTensor, an async collective's result)
    by the plain tensors inside it."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, name) for name in names]
        return [s for i in inner if isinstance(i, torch.Tensor) for s in local_storages(i)]
    return [t.untyped_storage()]


def data_ptrs(tensors) -> set[int]:
    """Data pointers of the local storages of ``tensors`` (e.g. parameters, to exclude them from a count)."""
    return {s.data_ptr() for t in tensors for s in local_storages(t)}

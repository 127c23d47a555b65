"""The mark a model's tensor-parallel code puts on row-parallel matmuls, read by selective recompute.

A TP block computes on plain local shards, so a row-parallel partial sum cannot be told from its arguments; the
model's block runs those matmuls inside :func:`partial_sums` and :mod:`hpcmega.parallel.recompute`'s policy asks
:func:`in_partial_sums`. Here, below both, so every model family marks its matmuls the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

# Per thread (autograd may recompute on another thread than the forward's), never shared between threads.
_in_partial_sums: ContextVar[bool] = ContextVar("in_partial_sums", default=False)


@contextlib.contextmanager
def partial_sums() -> Iterator[None]:
    """Matmuls run inside this are row-parallel: they contract a dimension sharded over "tp", so each result is a
    partial sum of the full sequence (t times the size of the reduced shard) that only the following reduce feeds
    on -- selective recompute does not keep it."""
    token = _in_partial_sums.set(True)
    try:
        yield
    finally:
        _in_partial_sums.reset(token)


def in_partial_sums() -> bool:
    """True inside :func:`partial_sums` on this thread."""
    return _in_partial_sums.get()

"""The context the loss runs in: with tensor parallelism the head's logits stay vocab-sharded DTensors, so the
cross-entropy (forward and backward) must run under ``loss_parallel()``. Model-independent: every family's TP plan
leaves the logits sharded the same way.
"""
from __future__ import annotations

import contextlib

from torch.distributed.tensor.parallel import loss_parallel


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Forward *and* backward of the loss must run inside this when the logits are vocab-sharded DTensors."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()

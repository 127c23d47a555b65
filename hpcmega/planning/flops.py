"""Model FLOPs per optimizer step (pure): one formula, used by the planner's step-time estimate and by the
training loop's MFU, so both count the same work.
"""
from __future__ import annotations


def model_flops_per_step(
    global_batch: int, seq_len: int, n_layers: int, d_model: int, vocab_size: int
) -> float:
    """Model FLOPs of one optimizer step (forward + backward, no recompute), Megatron's formula."""
    b, s, layers, h, v = global_batch, seq_len, n_layers, d_model, vocab_size
    return 72.0 * b * layers * s * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * h * layers))

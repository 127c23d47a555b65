"""Model FLOPs per optimizer step (pure): one formula, used by the planner's step-time estimate and by the
training loop's MFU, so both count the same work.
"""
from __future__ import annotations


def model_flops_per_step(
    global_batch: int, seq_len: int, n_layers: int, d_model: int, vocab_size: int, layer_matmul_params: int
) -> float:
    """Model FLOPs of one optimizer step (forward + backward, no recompute): 6 per matmul weight and token (the
    blocks' ``layer_matmul_params``, hpcmega.planning.families, and the V x h head, tied or not) plus 12 L s h per
    token for attention's QK^T and AV (causal masking not discounted). For GPT-2 (12 h^2 per layer) this is
    Megatron's 72 B L s h^2 (1 + s/(6h) + V/(12 h L))."""
    tokens = global_batch * seq_len
    matmuls = n_layers * layer_matmul_params + vocab_size * d_model
    return 6.0 * tokens * matmuls + 12.0 * tokens * n_layers * seq_len * d_model

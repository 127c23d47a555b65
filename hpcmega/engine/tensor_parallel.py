"""Tensor parallelism (Megatron-style) with optional sequence parallelism, expressed as DTensor plans.

Per block: wq/wk/wv and fc1 are split by output columns, wo and fc2 by input rows, so each block needs one
all-reduce (TP) or one all-gather + one reduce-scatter (TP+SP) per sub-layer. With sequence parallelism the residual
stream between sub-layers is sharded along the sequence (dim 1) and the LayerNorms run on their sequence shard.
Embeddings are vocab- (and position-) parallel; the head is column-parallel and its logits stay sharded over the
vocabulary, so the loss must run under ``loss_parallel()`` (see :func:`loss_context`).
"""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from hpcmega.model.gpt import GPT


class ReplicateParallel(ParallelStyle):
    """Norms without sequence parallelism: parameters become Replicate DTensors (so every parameter of a TP model is
    a DTensor on the same mesh, which FSDP2 and the grad-norm reduction expect); activations stay plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)

        def to_local(_mod, outputs, _mesh):
            return outputs.to_local()

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=to_local)


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (a full model or one pipeline stage) in place over ``tp_mesh``."""
    residual = Shard(1) if sequence_parallel else Replicate()

    def norm_style() -> ParallelStyle:
        return SequenceParallel() if sequence_parallel else ReplicateParallel()

    top: dict[str, ParallelStyle] = {}
    if model.tok_emb is not None:
        top["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
        top["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.ln_f is not None:
        top["ln_f"] = norm_style()
        top["head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)

    for block in model.blocks.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "ln1": norm_style(),
                "attn": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
                "attn.wq": ColwiseParallel(),
                "attn.wk": ColwiseParallel(),
                "attn.wv": ColwiseParallel(),
                "attn.wo": RowwiseParallel(output_layouts=residual),
                "ln2": norm_style(),
                "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
                "mlp.fc1": ColwiseParallel(),
                "mlp.fc2": RowwiseParallel(output_layouts=residual),
            },
        )


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Forward *and* backward of the loss must run inside this when the logits are vocab-sharded DTensors."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()

"""Forward-only loss on held-out batches, on the same parallel model parts as training.

Evaluation must be layout-invariant like training, so it reuses what a training step uses -- the same microbatch
split and loss scaling (each microbatch's loss / number of microbatches, summed), the same vocab-parallel loss
under TP, the same stage modules -- without backward. The caller reduces the returned local loss over "pp" and "dp"
as it does for training losses.

With pp > 1 the stages are run one after the other with explicit point-to-point sends of the hidden states, not
with the training schedule's ``schedule.eval()``: in torch 2.13 that runs the V-shaped schedules' (zbv, dualpipev)
backward bookkeeping between the two stages of one rank and fails ("can't steal_bwd_input if this stage doesn't
have backward"), and switching a schedule between train and eval re-runs its shape inference every time. The
sequential walk has no pipelining overlap, which is fine for a few evaluation batches, and works for every schedule
and stage placement.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hpcmega.parallel.pipeline import GradAccumulation, PipelineRunner, scaled_loss_fn
from hpcmega.parallel.loss import loss_context

# Header sent before each hidden-state tensor between pipeline ranks: ndim, shape (padded), dtype index.
_HEADER = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _value(loss: torch.Tensor) -> torch.Tensor:
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


@torch.no_grad()
def forward_loss(runner: GradAccumulation | PipelineRunner, inputs: torch.Tensor, targets: torch.Tensor,
                 n_microbatches: int) -> torch.Tensor | None:
    """This DP rank's mean loss over ``inputs`` (its rows of a global batch); None on a pipeline rank without the
    last stage."""
    if isinstance(runner, PipelineRunner):
        return StageWalk(runner).loss(inputs, targets, n_microbatches)
    loss_fn, total = scaled_loss_fn(n_microbatches), torch.zeros((), device=inputs.device)
    for x, y in zip(inputs.chunk(n_microbatches), targets.chunk(n_microbatches)):
        with loss_context(runner.tp), runner.parts.compute_context():
            total += _value(loss_fn(runner.model(x), y))
    return total


class StageWalk:
    """Every pipeline stage in order 0..S-1 for each microbatch; hidden states go to the rank owning the next stage
    (or stay on this rank, e.g. between a V-shaped schedule's two stages)."""

    def __init__(self, runner: PipelineRunner) -> None:
        self.parts, self.tp = runner.parts, runner.tp
        self.group = runner.stages[0].group
        owned: list[list[int]] = [[] for _ in range(dist.get_world_size(self.group))]
        dist.all_gather_object(owned, list(self.parts.stage_ids), group=self.group)
        self.owner = {stage: dist.get_global_rank(self.group, r) for r, stages in enumerate(owned) for stage in stages}
        self.me = dist.get_rank()
        self.modules = dict(zip(self.parts.stage_ids, self.parts.parts))

    def _send(self, x: torch.Tensor, dst: int) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0], header[1: 1 + x.dim()], header[-1] = x.dim(), torch.tensor(x.shape), _DTYPES.index(x.dtype)
        dist.send(header.to(x.device), dst, group=self.group)
        dist.send(x.contiguous(), dst, group=self.group)

    def _recv(self, src: int) -> torch.Tensor:
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.parts.device)
        dist.recv(header, src, group=self.group)
        ndim = int(header[0])
        x = torch.empty(header[1: 1 + ndim].tolist(), dtype=_DTYPES[int(header[-1])], device=self.parts.device)
        dist.recv(x, src, group=self.group)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One microbatch through every stage: the last stage's output (logits) on the rank holding it, None on
        the others."""
        last = self.parts.num_stages - 1
        for stage in range(self.parts.num_stages):
            if self.owner[stage] != self.me:
                continue
            if stage > 0 and self.owner[stage - 1] != self.me:
                x = self._recv(self.owner[stage - 1])
            x = self.modules[stage](x)
            if stage == last:
                return x
            if self.owner[stage + 1] != self.me:
                self._send(x, self.owner[stage + 1])
        return None

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, n_microbatches: int) -> torch.Tensor | None:
        loss_fn, total = scaled_loss_fn(n_microbatches), torch.zeros((), device=inputs.device)
        for x, y in zip(inputs.chunk(n_microbatches), targets.chunk(n_microbatches)):
            logits = self.forward(x)
            if logits is not None:
                with loss_context(self.tp):
                    total += _value(loss_fn(logits, y))
        return total if self.parts.has_last_stage else None

"""Run one step's forward and backward over a rank's microbatches: a ``torch.distributed.pipelining`` schedule
when pp > 1, plain gradient accumulation when pp = 1.

Loss scaling: each microbatch's loss is its mean token cross entropy divided by the number of microbatches, and
the schedules are told not to rescale (``scale_grads=False``). Every microbatch has the same number of tokens, so
the sum over microbatches is exactly the mean over this DP rank's rows, and FSDP2's gradient average over "dp" then
makes the gradient that of the mean over the whole global batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from hpcmega.errors import ConfigError
from hpcmega.parallel.parallelize import ModelParts
from hpcmega.parallel.loss import loss_context
from hpcmega.models.common import cross_entropy
from hpcmega.schedules import SCHEDULES, names


def scaled_loss_fn(n_microbatches: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets) / n_microbatches

    return loss_fn


def _plain(loss: torch.Tensor) -> torch.Tensor:
    """A detached local scalar (the vocab-parallel loss is a replicated DTensor)."""
    loss = loss.detach()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


class GradAccumulation:
    """pp = 1: forward/backward microbatch after microbatch.

    FSDP2 (``Config.reduce_every_microbatch``): either each unit's gradients are reduce-scattered after every
    microbatch and accumulate in their fp32 shards (ZeRO-3's default: nothing unsharded outlives a backward), or
    gradient sync is off before the last microbatch, so fp32 unsharded accumulators hold the rank's whole gradient
    for the step at 1/m of the traffic. Without ``reshard_after_forward`` (ZeRO-2) resharding after backward is off
    before the last microbatch too, so the gathered parameters, held through each forward and backward anyway, stay
    until the last backward: one all-gather per unit per step instead of one per microbatch, at the same peak. With
    ``reshard_after_forward`` (ZeRO-3) the parameters are freed after each backward as usual: keeping them would hold
    the whole unsharded model during the next forward, the memory ZeRO-3 is there to save. Replicate (DDP):
    ``no_sync`` before the last microbatch, one bucketed all-reduce per step.
    """

    def __init__(self, parts: ModelParts, n_microbatches: int, tp: int) -> None:
        (self.model,) = parts.parts
        self.parts = parts
        self.n_microbatches = n_microbatches
        self.tp = tp
        self.loss_fn = scaled_loss_fn(n_microbatches)
        self.keep_gathered = parts.fsdp and not parts.reshard_after_forward

    def _sync_context(self, last: bool):
        if self.parts.fsdp:
            self.model.set_requires_gradient_sync(last or self.parts.reduce_every_microbatch)
            if self.keep_gathered:
                self.model.set_reshard_after_backward(last)
        if self.parts.replicated is not None and not last:
            return self.parts.replicated.no_sync()
        return contextlib.nullcontext()

    def run(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=inputs.device)
        forward = self.parts.forward_module
        for i, (x, y) in enumerate(zip(inputs.chunk(self.n_microbatches), targets.chunk(self.n_microbatches))):
            with self._sync_context(i == self.n_microbatches - 1), loss_context(self.tp):
                with self.parts.compute_context():
                    loss = self.loss_fn(forward(x), y)
                loss.backward()
            total += _plain(loss)
        return total


class PipelineRunner:
    """pp > 1: one ``PipelineStage`` per owned stage, driven by the configured schedule."""

    def __init__(
        self,
        parts: ModelParts,
        pp_mesh: DeviceMesh,
        schedule: str,
        n_microbatches: int,
        tp: int,
        compiled: bool = False,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        facts = SCHEDULES[schedule]
        if compiled and facts.split_backward:  # torch.compile cannot split backward
            raise ConfigError(f"--compile does not work with the {schedule} schedule; use one of "
                              f"{'/'.join(names(split_backward=False))}")
        self.parts = parts
        self.tp = tp
        group = pp_mesh.get_group()
        self.stages = [
            PipelineStage(part, stage, parts.num_stages, parts.device, group=group)
            for part, stage in zip(parts.parts, parts.stage_ids)
        ]
        cls = getattr(pipelining, facts.torch_class)
        try:
            self.schedule = cls(
                self.stages if facts.multi_stage else self.stages[0],
                n_microbatches=n_microbatches,
                loss_fn=scaled_loss_fn(n_microbatches),
                scale_grads=False,
            )
        except ValueError as e:  # e.g. too few microbatches for the number of stages
            raise ConfigError(f"{schedule} schedule: {e} Adjust parallel.microbatches or train.global_batch.") from None

    def run(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Returns the sum of the scaled microbatch losses on the rank holding the last stage, else None."""
        args = (inputs,) if self.parts.has_first_stage else ()
        losses: list[torch.Tensor] = []
        kwargs = dict(target=targets, losses=losses) if self.parts.has_last_stage else {}
        with loss_context(self.tp):
            self.schedule.step(*args, return_outputs=False, **kwargs)
        if not self.parts.has_last_stage:
            return None
        return torch.stack([_plain(loss) for loss in losses]).sum()

"""Optimizer pieces: AdamW parameter groups, cosine learning rate with linear warmup, global grad-norm clipping.

Weight decay (decoupled, AdamW) applies to every matrix -- Linear weights *and* the token/position embeddings, as in
GPT-2 and Megatron -- and not to LayerNorm parameters or biases (1-D tensors): decaying a gain towards zero or a bias
towards the origin regularises nothing useful.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from hpcmega.config import TrainConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(module, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )


class CosineWithWarmup:
    """lr(step): linear warmup from lr/warmup to lr over ``warmup_steps``, then cosine down to ``min_lr`` at the last
    step. ``step`` is the index of the optimizer step about to run (0-based). The state is just that index."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.last_step = -1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizers: Iterable[torch.optim.Optimizer], step: int) -> float:
        lr = self.lr_at(step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, stage_replicas: int) -> torch.Tensor:
    """Global L2 norm of all gradients of the model, over every tp, dp and pp rank, in ONE all-reduce; then scale
    the gradients so the norm is at most ``max_norm`` (0 = do not clip). Returns the pre-clip norm, identical on
    every rank.

    Each rank adds the squared norm of its local gradient shards, divided by how many ranks hold the same values
    (the product of the mesh sizes a DTensor is replicated over; ``stage_replicas`` -- the ranks of one pipeline
    stage -- for plain tensors), and the sum over all ranks is the squared norm of the whole model. Must be called
    on every rank of the default process group (the training mesh spans all of it).
    """
    by_replicas: dict[int, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                raise RuntimeError("gradient still Partial; call hpcmega.parallel.grad_sync.reduce_partial_grads first")
            replicas = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            by_replicas[replicas].append(g.to_local())
        else:
            by_replicas[stage_replicas].append(g)
    device = next((ts[0].device for ts in by_replicas.values()), torch.device("cpu"))
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for replicas, tensors in by_replicas.items():
        norms = torch._foreach_norm(tensors, 2.0)
        squared += torch.stack(norms).float().square().sum() / replicas
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(squared)
    norm = squared.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for tensors in by_replicas.values():
            torch._foreach_mul_(tensors, coef.to(tensors[0].dtype))
    return norm

"""The bench's hand-written explicit-TP reference computes exactly what the single-process model computes: same
loss, and every gradient, gathered from the tp=2 slices, equal to the reference's (real gloo, two ranks)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from engine_harness import spawn

from hpcmega.config import Config

pytestmark = pytest.mark.slow


def tiny() -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 128, 64, 2, 4, 32
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seq_len = 4, 2, 32
    return cfg


def _compare(cfg: Config) -> dict:
    from hpcmega.bench.explicit_tp import ExplicitTPGPT, clip_grad_norm_explicit
    from hpcmega.bench.references import synthetic_batch
    from hpcmega.models.common import build_model, cross_entropy

    reference = build_model(cfg.model, cfg.train.seed)
    explicit = ExplicitTPGPT(build_model(cfg.model, cfg.train.seed), dist.group.WORLD)
    x, y = synthetic_batch(cfg, 0)
    ref_loss = cross_entropy(reference(x), y)
    ref_loss.backward()
    loss = explicit.loss(x, y)
    loss.backward()
    ref_grads = dict(reference.named_parameters())
    worst = 0.0
    for name, (param, dim) in explicit.shards.sources.items():
        grad = param.grad
        if dim is not None:
            parts = [torch.empty_like(grad) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, grad.contiguous())
            grad = torch.cat(parts, dim=dim)
        worst = max(worst, (grad - ref_grads[name].grad).abs().max().item())
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.0)
    norm = clip_grad_norm_explicit(explicit, 0.0)
    return {"loss": (loss.item(), ref_loss.item()), "worst_grad_diff": worst, "names": set(explicit.shards.sources),
            "ref_names": set(ref_grads), "norm": (norm.item(), ref_norm.item())}


def test_explicit_tp_equals_the_single_process_model():
    for result in spawn(2, _compare, tiny()):
        assert result["names"] == result["ref_names"]  # every parameter has its slice or copy
        assert result["loss"][0] == pytest.approx(result["loss"][1], rel=1e-6)
        assert result["worst_grad_diff"] < 1e-6
        assert result["norm"][0] == pytest.approx(result["norm"][1], rel=1e-5)

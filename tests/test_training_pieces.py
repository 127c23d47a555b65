"""The single-process pieces of training: AdamW groups, LR schedule, grad clipping, synthetic data, metrics."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from hpcmega.config import Config, ModelConfig, TrainConfig
from hpcmega.data.synthetic import SyntheticLoader
from hpcmega.training.metrics import MetricsWriter, format_line, peak_tflops, step_record
from hpcmega.models.common import build_model, cross_entropy
from hpcmega.training.optim import CosineWithWarmup, build_optimizer, clip_grad_norm_, param_groups


# -- optimizer ------------------------------------------------------------------------------------------------------
def test_weight_decay_on_matrices_only():
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight", "blocks.0.attn.wq.weight"} <= decayed
    assert not any(n.endswith(".bias") or ".ln" in n or n.startswith("ln_f") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_decoupled_weight_decay_shrinks_weights_without_gradient():
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16), seed=0)
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5))
    w = model.head.weight.detach().clone()
    b = model.blocks["0"].attn.wq.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.head.weight, w * (1 - 0.1 * 0.5))  # decoupled: lr * wd, not through Adam
    assert torch.equal(model.blocks["0"].attn.wq.bias, b)


def test_cosine_schedule_with_warmup():
    sched = CosineWithWarmup(lr=1e-3, min_lr=1e-4, warmup_steps=4, total_steps=20)
    lrs = [sched.lr_at(s) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup up to the peak
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then monotone decay
    assert lrs[-1] == pytest.approx(1e-4)  # reaching min_lr at the last step
    assert lrs[12] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 8 / 15)))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    assert sched.apply([opt], 2) == pytest.approx(7.5e-4) and opt.param_groups[0]["lr"] == pytest.approx(7.5e-4)
    state = sched.state_dict()
    other = CosineWithWarmup(1e-3, 1e-4, 4, 20)
    other.load_state_dict(state)
    assert other.last_step == 2


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    models = [build_model(cfg, seed=0) for _ in range(2)]
    for m in models:
        cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).backward()
    ours = clip_grad_norm_(list(models[0].parameters()), max_norm, stage_replicas=1)
    theirs = torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm if max_norm > 0 else float("inf"))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    if 0 < max_norm < theirs:
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in models[0].parameters()]))
        assert clipped.item() == pytest.approx(max_norm, rel=1e-4)


# -- synthetic data -------------------------------------------------------------------------------------------------
def _data_cfg(seed: int = 0) -> Config:
    cfg = Config()
    cfg.train.seed, cfg.train.global_batch, cfg.train.seq_len, cfg.model.vocab_size = seed, 4, 16, 128
    return cfg


def test_synthetic_batches_are_deterministic_per_sample_index():
    a, b = SyntheticLoader(_data_cfg()), SyntheticLoader(_data_cfg())
    batch = a.global_batch(3)
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    assert int(batch.min()) >= 0 and int(batch.max()) < 128
    assert torch.equal(batch, b.global_batch(3))  # same on every rank, in any order
    assert not torch.equal(batch, a.global_batch(4))
    assert not torch.equal(batch, SyntheticLoader(_data_cfg(seed=1)).global_batch(3))
    # A sample depends on its global index only, so a different global batch size sees the same stream.
    cfg8 = _data_cfg()
    cfg8.train.global_batch = 8
    assert torch.equal(SyntheticLoader(cfg8).global_batch(1)[4:], batch)  # samples 12..15 either way


def test_synthetic_loader_state_is_the_next_sample_index():
    loader = SyntheticLoader(_data_cfg())
    assert loader.state_dict() == {"next_index": 0}
    loader.global_batch(2)
    assert loader.state_dict() == {"next_index": 12}
    fresh = SyntheticLoader(_data_cfg())
    fresh.load_state_dict(loader.state_dict())
    assert fresh.next_index == 12


def test_synthetic_data_is_learnable():
    rows = SyntheticLoader(_data_cfg()).global_batch(0)
    steps = (rows[:, 1:] - rows[:, :-1]) % 128
    # Most consecutive differences repeat the sample's stride; noise breaks a minority.
    mode_share = max((steps[r] == steps[r].mode().values).float().mean().item() for r in range(4))
    assert mode_share > 0.6


# -- metrics --------------------------------------------------------------------------------------------------------
def test_peak_lookup_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops(None, "bf16") is None and peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None
    record = step_record(
        step=2, loss=3.0, lr=1e-3, grad_norm=0.5, tokens_per_step=1000, step_time_s=0.5,
        flops_per_step=8 * 989e12 * 0.5 * 0.4, world_size=8, peak=989.0, mem_peak_gib=12.5, skipped_steps=0,
    )  # fmt: skip
    assert record["tokens"] == 2000 and record["tokens_per_s"] == 2000
    assert record["model_tflops"] == pytest.approx(989.0 * 0.4)
    assert record["mfu"] == pytest.approx(0.4)
    assert record["mem_peak_gib"] == 12.5
    cpu = step_record(
        step=1, loss=3.0, lr=1e-3, grad_norm=0.5, tokens_per_step=1000, step_time_s=0.5,
        flops_per_step=1e9, world_size=1, peak=None, mem_peak_gib=0.5, skipped_steps=0,
    )  # fmt: skip
    assert "mfu" not in cpu


def test_metrics_writer_appends_json_lines(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    for step in (1, 2):
        w = MetricsWriter(path)  # a resumed job opens the file again and appends
        w.write({"step": step, "loss": 1.0 / step})
        w.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_console_line_is_plain_without_a_tty():
    from rich.console import Console

    record = step_record(
        step=3, loss=2.5, lr=3e-4, grad_norm=1.25, tokens_per_step=4096, step_time_s=0.25,
        flops_per_step=4e12, world_size=4, peak=989.0, mem_peak_gib=3.25, skipped_steps=2,
    )  # fmt: skip
    out = io.StringIO()
    Console(file=out, highlight=False, soft_wrap=True).print(format_line(record, 10))
    text = out.getvalue()
    assert "\x1b[" not in text and text.count("\n") == 1
    for piece in ("step 3/10", "loss 2.5000", "lr 3.00e-04", "gnorm 1.250", "16.4k tok/s", "MFU 0.4%", "mem 3.25 GiB",
                  "skipped 2", "250 ms"):
        assert piece in text, (piece, text)

"""The estimator against the real engine: `plan --measure` runs one rank of a job at full size on fake tensors and
a fake process group (nothing computed, nothing scaled down) and counts parameters, gradients, optimizer state,
activations and the peak of a training step. Agreement: +-10% for model state, +-15% for activations and peak at
tiny widths (every layout kind); +-10% for everything at a real width and vocabulary.

The measurement itself is pinned twice: fake tensors allocate exactly what real ones do, and running the schedule
for its warm-up + one steady round measures what running every microbatch measures.

All layouts run in ONE subprocess (a fake default process group must not leak into the pytest process).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import CLI_ENV, run_cli

TINY = {"model.vocab_size": 512, "model.d_model": 64, "model.n_heads": 8, "model.n_layers": 8,
        "model.max_seq_len": 64, "train.seq_len": 64, "train.global_batch": 4, "cluster.nodes": 1,
        # explicit where the GPU-job defaults would choose otherwise (config.resolve_defaults)
        "train.micro_batch": 1, "cluster.gpus_per_node": 1, "train.precision": "fp32", "parallel.recompute": "none"}

LLAMA = {"model.family": "llama", "model.n_kv_heads": 2, "model.ffn_hidden": 192}

# name -> overrides; together: tp 1/2/4/8, pp 1/2/4, FSDP dp>1, replicate, recompute none/selective/full, SP on and
# off, gpipe/1f1b/interleaved, fp32 and bf16, both model families.
LAYOUTS = {
    "tp1-fp32-none": {"cluster.gpus_per_node": 1},
    "tp2-sp-selective": {"parallel.tp": 2, "parallel.recompute": "selective", "cluster.gpus_per_node": 2},
    "tp4-nosp-full": {"parallel.tp": 4, "parallel.sequence_parallel": False, "parallel.recompute": "full",
                      "cluster.gpus_per_node": 4},
    "tp8-sp-bf16": {"parallel.tp": 8, "train.precision": "bf16", "cluster.gpus_per_node": 8},
    "replicate-dp2": {"parallel.data_parallel": "replicate", "cluster.gpus_per_node": 2, "train.global_batch": 8},
    "pp2-1f1b-dp2": {"parallel.pp": 2, "cluster.gpus_per_node": 4, "train.global_batch": 8},
    "pp4-gpipe-tp2-bf16-selective": {"parallel.pp": 4, "parallel.tp": 2, "parallel.schedule": "gpipe",
                                     "train.precision": "bf16", "parallel.recompute": "selective",
                                     "cluster.gpus_per_node": 8},
    "pp2-interleaved-tp2-dp2-bf16-full": {"parallel.pp": 2, "parallel.tp": 2, "cluster.gpus_per_node": 8,
                                          "parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2,
                                          "train.precision": "bf16", "parallel.recompute": "full",
                                          "train.global_batch": 8},
    "pp4-1f1b-dp2-selective": {"parallel.pp": 4, "cluster.gpus_per_node": 8, "parallel.recompute": "selective",
                               "train.global_batch": 8},
    # llama (8 query heads sharing 2 kv heads): kv heads split at tp 2, replicated at tp 4 and 8
    "llama-tp2-sp-selective": {**LLAMA, "parallel.tp": 2, "parallel.recompute": "selective",
                               "cluster.gpus_per_node": 2},
    "llama-tp8-sp-bf16": {**LLAMA, "parallel.tp": 8, "train.precision": "bf16", "cluster.gpus_per_node": 8},
    "llama-pp2-tp4-bf16-selective": {**LLAMA, "parallel.pp": 2, "parallel.tp": 4, "train.precision": "bf16",
                                     "parallel.recompute": "selective", "cluster.gpus_per_node": 8},
}
KEYS = ("params", "grads", "optimizer", "activations", "peak")
# Fake == real and "warm-up + one steady round" == "every microbatch": a pipelined FSDP2 + TP/SP + bf16 rank with
# 8 microbatches (receive buffers, resized unsharded parameters, DTensor redistributes all in play).
PINNED = {**TINY, "parallel.pp": 2, "parallel.tp": 2, "cluster.gpus_per_node": 8, "train.precision": "bf16",
          "train.global_batch": 16}

SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import torch.distributed as dist
    from hpcmega.config import load_config
    from hpcmega.bench.measure import measure_config, measure_rank
    layouts, pinned = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {}
    for name, overrides in layouts.items():
        got = measure_config(load_config(None, overrides))
        out[name] = [{"stage": r.stage,
                      "measured": {k: getattr(r, k) for k in %r},
                      "estimated": {k: getattr(got.estimate.ranks[r.stage], k) for k in %r}}
                     for r in got.ranks]
    cfg = load_config(None, pinned)
    out["_pinned"] = {how: [dataclasses.asdict(measure_rank(cfg, r, **kw)) for r in (0, 1)]
                      for how, kw in (("fake", {}), ("real", {"fake": False}), ("every", {"every_microbatch": True}))}
    import torch
    t = torch.ones(3)
    dist.all_reduce(t)  # faked: returns at once, nothing summed over the other ranks
    out["_seam"] = {"backend": dist.get_backend(), "world": dist.get_world_size(), "rank": dist.get_rank(),
                    "after_all_reduce": t.tolist()}
    print("RESULT " + json.dumps(out))
""" % (KEYS, KEYS))


@pytest.fixture(scope="module")
def measured() -> dict:
    layouts = {name: {**TINY, **overrides} for name, overrides in LAYOUTS.items()}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(layouts), json.dumps(PINNED)], env=CLI_ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_fake_process_group_seam_is_what_measure_relies_on(measured):
    """Pins torch's private fake backend (torch.testing._internal.distributed.fake_pg): one process, a world of
    any size, collectives that return without communicating."""
    seam = measured["_seam"]
    assert seam["backend"] == "fake" and seam["world"] > 4096 and seam["rank"] == 4096
    assert seam["after_all_reduce"] == [1.0, 1.0, 1.0]


def _same(a: dict, b: dict) -> None:
    """Equal to a scalar: a fake run creates one 4-byte constant (``lift_fresh``) the real one does not."""
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=16), (key, a, b)


def test_fake_tensors_measure_what_real_tensors_allocate(measured):
    fake, real = measured["_pinned"]["fake"], measured["_pinned"]["real"]
    _same(fake[0], real[0])
    assert {k: fake[1][k] for k in ("params", "grads", "optimizer", "per_layer")} == \
        {k: real[1][k] for k in ("params", "grads", "optimizer", "per_layer")}


@pytest.mark.xfail(strict=True, reason="not understood yet: on the last stage the real run keeps three more b*s*h "
                                       "bf16 tensors (24,576 bytes here, from the sequence-parallel all-gather "
                                       "around the head) than the fake one")
def test_fake_tensors_measure_what_real_tensors_allocate_on_the_last_stage(measured):
    _same(measured["_pinned"]["fake"][1], measured["_pinned"]["real"][1])


def test_the_schedules_warm_up_and_one_steady_round_reach_the_peak_of_every_microbatch(measured):
    fake, every = measured["_pinned"]["fake"], measured["_pinned"]["every"]
    for a, b in zip(fake, every):
        _same(a, b)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_estimate_agrees_with_the_real_engine(measured, name):
    for rank in measured[name]:
        got, want = rank["measured"], rank["estimated"]
        for key, tolerance in (("params", 0.10), ("grads", 0.10), ("optimizer", 0.10), ("activations", 0.15),
                               ("peak", 0.15)):
            assert want[key] == pytest.approx(got[key], rel=tolerance), (name, rank["stage"], key, got, want)


def test_measured_ranks_include_first_and_last_stage(measured):
    assert [r["stage"] for r in measured["pp4-1f1b-dp2-selective"]] == [0, 3]
    first, last = measured["pp4-1f1b-dp2-selective"]
    assert first["measured"]["params"] > last["measured"]["params"]  # embeddings (576 x 64) > head (512 x 64)


@pytest.fixture(scope="module")
def real_width() -> dict:
    """gpt2-124m's widths and vocabulary (two blocks) at tp 2, pp 2, dp 2, bf16, 8 microbatches, through the CLI."""
    result = run_cli(["plan", "--vocab-size", "50304", "--d-model", "768", "--heads", "12", "--layers", "2",
                      "--nodes", "1", "--gpus-per-node", "8", "--tp", "2", "--pp", "2", "--seq-len", "256",
                      "--global-batch", "16", "--micro-batch", "1", "--precision", "bf16", "--gpu", "h100",
                      "--measure", "--json"], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_plan_measure_json_at_a_real_width(real_width):
    """Every stage's peak within 10% at gpt2-124m's vocabulary: the vocab-parallel embedding's gradient (this rank's
    rows), the loss's logits-sized transients and the pipeline's receive buffers are all in the estimate."""
    measured = real_width["measured"]
    assert [s["stage"] for s in measured["memory"]["stages"]] == [0, 1]
    assert measured["microbatches_run"] == 3  # 1F1B at pp 2: warm-up 2 + one steady round, of m = 8
    for got, want in zip(measured["memory"]["stages"], measured["estimate_of_measured"]["stages"]):
        for key in ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "peak_gib"):
            assert want[key] == pytest.approx(got[key], rel=0.10), (got["stage"], key, got, want)
    assert set(real_width["memory"]) == {"gpu", "gpu_mem_gib", "stages", "peak_gib", "fits"}

"""The estimator against the real engine: `plan --measure` runs one rank of a job on a fake process group (one CPU
process, real local tensors, collectives faked) and measures parameters, gradients, optimizer state, activations
and the peak of a training step. Agreement: +-10% for model state, +-15% for activations and peak.

All layouts run in ONE subprocess (a fake default process group must not leak into the pytest process), tiny widths
so the whole file takes about a minute on one core.
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

# name -> overrides; together: tp 1/2/4/8, pp 1/2/4, FSDP dp>1, recompute none/selective/full, SP on and off,
# gpipe/1f1b/interleaved, fp32 and bf16.
LAYOUTS = {
    "tp1-fp32-none": {"cluster.gpus_per_node": 1},
    "tp2-sp-selective": {"parallel.tp": 2, "parallel.recompute": "selective", "cluster.gpus_per_node": 2},
    "tp4-nosp-full": {"parallel.tp": 4, "parallel.sequence_parallel": False, "parallel.recompute": "full",
                      "cluster.gpus_per_node": 4},
    "tp8-sp-bf16": {"parallel.tp": 8, "train.precision": "bf16", "cluster.gpus_per_node": 8},
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
}

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from hpcmega.config import load_config
    from hpcmega.bench.measure import measure_config, _ensure_world
    layouts = json.loads(sys.argv[1])
    out = {}
    for name, overrides in layouts.items():
        got = measure_config(load_config(None, overrides))
        out[name] = [{"stage": r.stage,
                      "measured": {k: getattr(r, k) for k in ("params", "grads", "optimizer", "activations", "peak")},
                      "estimated": {k: getattr(got.estimate.ranks[r.stage], k)
                                    for k in ("params", "grads", "optimizer", "activations", "peak")}}
                     for r in got.ranks]
    import torch
    t = torch.ones(3)
    dist.all_reduce(t)  # faked: returns at once, nothing summed over the other ranks
    out["_seam"] = {"backend": dist.get_backend(), "world": dist.get_world_size(), "rank": dist.get_rank(),
                    "after_all_reduce": t.tolist()}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def measured() -> dict:
    layouts = {name: {**TINY, **overrides} for name, overrides in LAYOUTS.items()}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(layouts)], env=CLI_ENV, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_fake_process_group_seam_is_what_measure_relies_on(measured):
    """Pins torch's private fake backend (torch.testing._internal.distributed.fake_pg): one process, a world of
    any size, collectives that return without communicating."""
    seam = measured["_seam"]
    assert seam["backend"] == "fake" and seam["world"] > 4096 and seam["rank"] == 4096
    assert seam["after_all_reduce"] == [1.0, 1.0, 1.0]


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


def test_plan_measure_json_of_a_model_too_big_for_this_machine_measures_a_scaled_copy():
    # 48 layers of width 256 against a 20 MiB allowance: measured as a few layers of the same width.
    result = run_cli(["plan", "--vocab-size", "1024", "--d-model", "256", "--heads", "8", "--layers", "48",
                      "--nodes", "1", "--gpus-per-node", "4", "--tp", "2", "--pp", "2", "--seq-len", "64",
                      "--global-batch", "8", "--precision", "bf16", "--gpu", "h100", "--measure",
                      "--measure-mem-gib", "0.02", "--json"], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    measured = data["measured"]
    assert measured["scaled"].startswith("measured a scaled copy: ") and "of 48 layers, same widths" in measured["scaled"]
    assert [s["stage"] for s in measured["memory"]["stages"]] == [0, 1]
    for got, want in zip(measured["memory"]["stages"], measured["estimate_of_measured"]["stages"]):
        assert want["params_gib"] == pytest.approx(got["params_gib"], rel=0.10)
        assert want["peak_gib"] == pytest.approx(got["peak_gib"], rel=0.15)
    assert set(data["memory"]) == {"gpu", "gpu_mem_gib", "stages", "peak_gib", "fits"}

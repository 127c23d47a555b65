"""Layout invariance: tp, pp (every schedule), dp, their combinations, recompute, compile and bf16 change where the
math runs, not what it computes. Each layout trains the same tiny GPT on the same global batches for 5 steps and is
compared with a single process, step by step (loss) and parameter by parameter (first-step gradients, by full name).
The llama family runs through the same layouts (names ``llama-...``, compared with ``llama-single`` under the same
tolerances); its 4 query heads share 2 kv heads, so tp=2 splits the kv heads and tp=4 replicates them. The tied
llama (head = embedding weight) has its own reference, ``llama-tied-single``.

Runs real gloo process groups. Layouts of one world size share one process group (see engine_harness.run_layouts).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_harness import Layout, merge_ranks, run_layouts, spawn

from hpcmega.config import Config

pytestmark = pytest.mark.slow

STEPS = 5
LOSS_RTOL = 1e-5  # fp32, any layout vs one process
GRAD_ATOL = 1e-6  # fp32 first-step gradients
BF16_RTOL = 5e-3  # bf16 compute (fp32 master weights and loss) vs fp32


def tiny_config(**overrides) -> Config:
    """vocab 128, d 64, 4 heads, 4 layers, seq 32, global batch 8; overrides as 'section.key'."""
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 128, 64, 4, 4, 64
    t = cfg.train
    t.steps, t.global_batch, t.micro_batch, t.seq_len, t.warmup_steps = STEPS, 8, 2, 32, 2
    cfg.logging.log_every = STEPS
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    return cfg


# name -> config overrides. World size = tp * pp * (dp from the process group).
LLAMA = {"model.family": "llama", "model.n_kv_heads": 2, "model.ffn_hidden": 160}  # GQA: 2 query heads per kv head


def llama(**overrides) -> dict:
    return {**LLAMA, **overrides}


TIED = {"model.tie_embeddings": True}  # the head is the embedding's weight (pp = 1 only)
REFERENCE = {"single": {}, "llama-single": llama(), "llama-tied-single": llama(**TIED)}
TWO_RANKS = {
    "tp2": {"parallel.tp": 2},
    "tp2-no-sequence-parallel": {"parallel.tp": 2, "parallel.sequence_parallel": False},
    "dp2": {},
    "dp2-microbatch4": {"train.micro_batch": 1},
    "dp2-no-reshard-microbatch4": {"train.micro_batch": 1, "parallel.reshard_after_forward": False},
    "dp2-replicate-microbatch4": {"train.micro_batch": 1, "parallel.data_parallel": "replicate"},
    "dp2-replicate-bf16": {"parallel.data_parallel": "replicate", "train.precision": "bf16"},
    "pp2-gpipe": {"parallel.pp": 2, "parallel.schedule": "gpipe"},
    "pp2-1f1b": {"parallel.pp": 2, "parallel.schedule": "1f1b"},
    "pp2-interleaved-1f1b-v2": {
        "parallel.pp": 2, "parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2,
    },
    "pp2-zero-bubble-v2": {"parallel.pp": 2, "parallel.schedule": "zero-bubble", "parallel.virtual_stages": 2},
    "pp2-zbv": {"parallel.pp": 2, "parallel.schedule": "zbv"},
    "pp2-dualpipev": {"parallel.pp": 2, "parallel.schedule": "dualpipev"},
    "tp2-recompute-selective": {"parallel.tp": 2, "parallel.recompute": "selective"},
    "tp2-recompute-full": {"parallel.tp": 2, "parallel.recompute": "full"},
    "tp2-compile": {"parallel.tp": 2, "parallel.compile": True},
    "tp2-bf16": {"parallel.tp": 2, "train.precision": "bf16"},
    "llama-tp2": llama(**{"parallel.tp": 2}),
    "llama-dp2": llama(),
    "llama-pp2-interleaved-1f1b-v2": llama(**{
        "parallel.pp": 2, "parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2,
    }),
    "llama-pp2-zbv": llama(**{"parallel.pp": 2, "parallel.schedule": "zbv"}),
    "llama-tp2-recompute-selective": llama(**{"parallel.tp": 2, "parallel.recompute": "selective"}),
    "llama-tp2-bf16": llama(**{"parallel.tp": 2, "train.precision": "bf16"}),
    "llama-tied-tp2": llama(**TIED, **{"parallel.tp": 2}),
    "llama-tied-dp2": llama(**TIED),
}
FOUR_RANKS = {
    "pp2-tp2": {"parallel.pp": 2, "parallel.tp": 2},
    "pp2-tp2-recompute-selective": {"parallel.pp": 2, "parallel.tp": 2, "parallel.recompute": "selective"},
    "pp2-tp2-zbv-recompute-full": {
        "parallel.pp": 2, "parallel.tp": 2, "parallel.schedule": "zbv", "parallel.recompute": "full",
    },
    "pp2-dp2-zero-bubble-v2": {"parallel.pp": 2, "parallel.schedule": "zero-bubble", "parallel.virtual_stages": 2},
    "llama-pp2-tp2": llama(**{"parallel.pp": 2, "parallel.tp": 2}),
    "llama-tp4-kv-replicated": llama(**{"parallel.tp": 4}),
}
EIGHT_RANKS = {
    "pp2-dp2-tp2": {"parallel.pp": 2, "parallel.tp": 2},
    "pp2-dp2-tp2-interleaved-full-no-reshard": {
        "parallel.pp": 2, "parallel.tp": 2, "parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2,
        "parallel.recompute": "full", "parallel.reshard_after_forward": False,
    },
}
BF16 = {"tp2-bf16", "dp2-replicate-bf16", "llama-tp2-bf16"}  # FSDP2's mixed-precision policy; autocast under replicate
# Trained through the public ``hpcmega.training.train.train`` entry point (no gradient capture hook).
VIA_TRAIN_ENTRY_POINT = {"pp2-dp2-tp2-interleaved-full-no-reshard"}
# Configurations the engine must refuse, on every rank, with a ConfigError naming the fix, before writing anything.
BAD_TWO_RANKS = {
    "bad-compile-with-zbv": ({"parallel.pp": 2, "parallel.schedule": "zbv", "parallel.compile": True}, "--compile"),
    "bad-too-few-microbatches": ({"parallel.pp": 2, "train.micro_batch": 8}, "parallel.microbatches"),
    "bad-batch-not-divisible-by-dp": ({"train.global_batch": 7, "train.micro_batch": 1}, "train.global_batch"),
    "bad-heads-not-divisible-by-tp": ({"parallel.tp": 2, "model.n_heads": 1}, "use --tp 1"),
    "bad-replicate-with-tp": ({"parallel.tp": 2, "parallel.data_parallel": "replicate"}, "--data-parallel fsdp"),
}


def _run_group(world_size: int, layouts: dict[str, dict], tmp: Path, bad: dict | None = None) -> dict[str, dict]:
    runs = [
        Layout(name, tiny_config(**kw), str(tmp / name), capture_grads=name not in VIA_TRAIN_ENTRY_POINT)
        for name, kw in layouts.items()
    ]
    for name, (kw, _) in (bad or {}).items():
        runs.append(Layout(name, tiny_config(**kw), str(tmp / name), expect_error=True))
    return merge_ranks(spawn(world_size, run_layouts, runs))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("invariance")
    out: dict[str, dict] = {}
    for world_size, layouts, bad in ((1, REFERENCE, None), (2, TWO_RANKS, BAD_TWO_RANKS), (4, FOUR_RANKS, None),
                                     (8, EIGHT_RANKS, None)):
        for name, result in _run_group(world_size, layouts, tmp, bad).items():
            out[name] = {**result, "run_dir": tmp / name}
    return out


def _get(results: dict, name: str) -> dict:
    result = results[name]
    assert "error" not in result, f"{name} failed:\n{result['error']}"
    return result


def _reference(name: str) -> str:
    if name.startswith("llama-tied-"):
        return "llama-tied-single"
    return "llama-single" if name.startswith("llama-") else "single"


def _assert_losses_close(name: str, losses: list[float], ref: list[float], rtol: float) -> None:
    assert len(losses) == len(ref) == STEPS
    for step, (got, want) in enumerate(zip(losses, ref), start=1):
        assert math.isfinite(got), f"{name}: loss at step {step} is {got}"
        assert abs(got - want) <= rtol * abs(want), (
            f"{name}: step {step} loss {got:.8f} vs single process {want:.8f} (rel {abs(got - want) / want:.2e})"
        )


FP32_LAYOUTS = [n for n in (*TWO_RANKS, *FOUR_RANKS, *EIGHT_RANKS) if n not in BF16]


@pytest.mark.parametrize("name", FP32_LAYOUTS)
def test_losses_match_single_process(results, name):
    ref = _get(results, _reference(name))["losses"]
    got = _get(results, name)
    _assert_losses_close(name, got["losses"], ref, LOSS_RTOL)
    # The reported loss is the global mean, the same number on every rank.
    assert all(rank_losses == got["losses"] for rank_losses in got["rank_losses"]), got["rank_losses"]
    # The global grad norm (tp/dp/pp reduced) is layout independent too.
    ref_norms = _get(results, _reference(name))["grad_norms"]
    for a, b in zip(got["grad_norms"], ref_norms):
        assert abs(a - b) <= LOSS_RTOL * b, (name, got["grad_norms"], ref_norms)


@pytest.mark.parametrize("name", [n for n in FP32_LAYOUTS if n not in VIA_TRAIN_ENTRY_POINT])
def test_first_step_gradients_match_single_process(results, name):
    ref = _get(results, _reference(name))
    got = _get(results, name)
    assert got["param_names"] == set(ref["grads"]), "parameter names differ from the full model's"
    assert set(got["grads"]) == set(ref["grads"])
    for pname, want in ref["grads"].items():
        have = got["grads"][pname]
        assert have is not None, f"{name}: {pname} got no gradient"
        assert have.shape == want.shape, pname
        diff = (have - want).abs().max().item()
        assert diff <= GRAD_ATOL, f"{name}: grad of {pname} differs by {diff:.2e}"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_the_model_learns(results, name):
    losses = _get(results, name)["losses"]
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("name", sorted(BF16))
def test_bf16_close_to_fp32(results, name):
    ref = _get(results, _reference(name))["losses"]
    got = _get(results, name)
    _assert_losses_close(name, got["losses"], ref, BF16_RTOL)
    assert got["losses"] != ref, "bf16 gave bit-identical fp32 losses: mixed precision is not in effect"
    # fp32 master weights: the gradients handed to the optimizer are fp32.
    assert all(g.dtype == torch.float32 for g in got["grads"].values())


def test_metrics_jsonl_from_rank_zero(results):
    for name in ("single", "pp2-dp2-tp2"):
        result = _get(results, name)
        lines = (result["run_dir"] / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == STEPS, f"{name}: expected one line per step from rank 0 only, got {len(lines)}"
        records = [json.loads(line) for line in lines]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert [r["loss"] for r in records] == result["losses"]
        for r in records:
            for key in ("lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s", "model_tflops"):
                assert isinstance(r[key], float | int) and r[key] >= 0, (key, r)
            assert "mfu" not in r, "no MFU on CPU: the peak is unknown"
        assert records[-1]["tokens"] == STEPS * 8 * 32


@pytest.mark.parametrize("name", BAD_TWO_RANKS)
def test_bad_layouts_refused_with_a_fix(results, name):
    result = results[name]
    _, fix = BAD_TWO_RANKS[name]
    assert "error" in result, f"{name} trained although it should have been refused"
    assert result["failed_ranks"] == 2, "every rank must refuse the same configuration"
    last_line = result["error"].strip().splitlines()[-1]
    assert last_line.startswith("hpcmega.errors.ConfigError:"), last_line
    assert fix in last_line, last_line
    assert not (result["run_dir"] / "metrics.jsonl").exists(), "nothing may be written before the refusal"

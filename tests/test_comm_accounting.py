"""Communication accounting: the collectives one real training step issues (recorded per mesh dimension and
collective by hpcmega.parallel.comm_stats, written to metrics.jsonl with ``logging.comm_stats``) equal the planner's
analytical bytes per step (hpcmega.planning.estimate.comm_bytes_per_step) within 5% -- so a per-microbatch
re-gather, a redundant all-reduce or a missing term in the planner shows up here. Real gloo process groups.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from engine_harness import Layout, merge_ranks, run_layouts, spawn

from hpcmega.config import Config, resolve_defaults
from hpcmega.planning.estimate import Shape, comm_bytes_per_step

pytestmark = pytest.mark.slow

TOLERANCE = 0.05


def small_config(**overrides) -> Config:
    """vocab 128, d 64, 4 heads, 4 layers, seq 32, global batch 8 in micro-batches of 2; 2 steps."""
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 128, 64, 4, 4, 64
    t = cfg.train
    t.steps, t.global_batch, t.micro_batch, t.seq_len, t.warmup_steps = 2, 8, 2, 32, 1
    cfg.logging.comm_stats = True
    cfg.checkpoint.resume = "none"
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    resolve_defaults(cfg, on_gpu=False)  # CPU jobs: fp32, no recompute
    return cfg


TWO_RANKS = {
    "tp2": {"parallel.tp": 2},
    "tp2-no-sequence-parallel": {"parallel.tp": 2, "parallel.sequence_parallel": False},
    "pp2-1f1b": {"parallel.pp": 2, "parallel.schedule": "1f1b"},
    "pp2-interleaved-v2": {"parallel.pp": 2, "parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2},
    "dp2-fsdp": {},
    "dp2-fsdp-no-reshard": {"parallel.reshard_after_forward": False},
    "dp2-fsdp-reduce-once": {"parallel.reduce_every_microbatch": False},
    "dp2-replicate": {"parallel.data_parallel": "replicate"},
    "tp2-bf16-one-microbatch": {"parallel.tp": 2, "train.precision": "bf16", "train.micro_batch": 8},
}
FOUR_RANKS = {
    "pp2-dp2": {"parallel.pp": 2, "parallel.schedule": "1f1b"},
    "dp2-tp2-bf16-one-microbatch": {"parallel.tp": 2, "train.precision": "bf16", "train.micro_batch": 4},
}


def _run(world_size: int, cases: dict[str, dict]) -> dict[str, tuple[Config, dict]]:
    root = Path(tempfile.mkdtemp(prefix="comm-"))
    layouts = [Layout(name, small_config(**o), str(root / name)) for name, o in cases.items()]
    results = merge_ranks(spawn(world_size, run_layouts, layouts))
    out = {}
    for layout in layouts:
        assert "error" not in results[layout.name], results[layout.name].get("error")
        records = [json.loads(line) for line in (Path(layout.run_dir) / "metrics.jsonl").read_text().splitlines()]
        out[layout.name] = (layout.cfg, records[-1])
    return out


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[Config, dict]]:
    return {**_run(2, TWO_RANKS), **_run(4, FOUR_RANKS)}


def _with_dp(cfg: Config, world_size: int) -> Config:
    cfg.cluster.nodes, cfg.cluster.gpus_per_node = 1, world_size
    return cfg


@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_measured_bytes_equal_the_planners_count(measured, name):
    cfg, record = measured[name]
    world = 4 if name in FOUR_RANKS else 2
    planned = comm_bytes_per_step(Shape.from_config(_with_dp(cfg, world)))
    got = record["comm_bytes"]
    for dim in ("tp", "pp", "dp"):
        want = planned[dim]
        if want == 0:
            assert got.get(dim, 0) == 0, (dim, got, planned)
        else:
            assert abs(got.get(dim, 0) - want) <= TOLERANCE * want, (dim, got, planned, record["comm_ops"])
    assert got.get("world", 0) <= 64, got  # only the loss and grad-norm scalars cross the whole world


def test_replicated_gradients_are_reduced_in_one_all_reduce(measured):
    """tp2 + SP: the LayerNorm and row-parallel-bias gradients (Partial over tp) cost one all-reduce per step, not
    one per parameter (26 here); the other tp all-reduce is the global grad norm (tp is the whole world in this layout)."""
    _cfg, record = measured["tp2"]
    assert record["comm_ops"]["tp/all_reduce"]["count"] == 2, record["comm_ops"]


@pytest.mark.parametrize("name, all_reduces", [("tp2-bf16-one-microbatch", 2), ("dp2-tp2-bf16-one-microbatch", 1)])
def test_gradient_reductions_are_fp32_and_fused_with_one_microbatch_in_bf16(measured, name, all_reduces):
    """bf16 compute, one microbatch, SP: the replicated parameters' partial gradients (both norms and the wo/fc2
    biases of 4 blocks, the final norm: 26 tensors) cross tp in one fp32 all-reduce -- not one bf16 all-reduce per
    tensor, FSDP2's way -- (at tp2 next to the grad-norm scalar, tp being the whole world there); FSDP2's gradient
    reduce-scatters are fp32 too."""
    _cfg, record = measured[name]
    ops = record["comm_ops"]
    tp = ops["tp/all_reduce"]
    assert tp["count"] == tp.get("count_float32") == all_reduces, ops
    for key in ("dp/reduce_scatter", "dp/all_reduce"):
        if key in ops:
            assert ops[key]["count"] == ops[key].get("count_float32"), ops


def test_fsdp_gathers_once_per_step_inside_a_pipeline(measured):
    """pp2 x dp2: each rank's three FSDP units (its two blocks, its root) are gathered once per step, not once per
    microbatch, and their gradients reduce-scattered once."""
    _cfg, record = measured["pp2-dp2"]
    ops = record["comm_ops"]
    assert ops["dp/all_gather"]["count"] == 3 and ops["dp/reduce_scatter"]["count"] == 3, ops


def test_zero2_gathers_once_per_step_with_accumulation(measured):
    """dp2 without reshard_after_forward, 2 microbatches: the five FSDP units (four blocks, the root) stay gathered
    from the first forward to the last backward -- one all-gather and one reduce-scatter each per step."""
    _cfg, record = measured["dp2-fsdp-no-reshard"]
    ops = record["comm_ops"]
    assert ops["dp/all_gather"]["count"] == 5 and ops["dp/reduce_scatter"]["count"] == 5, ops


def test_zero3_reduce_scatters_every_microbatch_unless_told_to_wait(measured):
    """dp2 with ZeRO-3 (pp = 1's default), 2 microbatches: the five FSDP units are gathered in each forward and
    backward, and reduce-scattered after each microbatch (torchtitan's way: only sharded gradients accumulate) --
    or once per step with ``parallel.reduce_every_microbatch = false``."""
    every, once = measured["dp2-fsdp"][1]["comm_ops"], measured["dp2-fsdp-reduce-once"][1]["comm_ops"]
    assert every["dp/all_gather"]["count"] == once["dp/all_gather"]["count"] == 20, (every, once)
    assert every["dp/reduce_scatter"]["count"] == 10 and once["dp/reduce_scatter"]["count"] == 5, (every, once)


def test_replicate_only_all_reduces_gradients(measured):
    """dp2 replicate (DDP), 2 microbatches: no gathers or reduce-scatters, and the gradients cross once per step in
    DDP's buckets (this model's 0.9 MB fit in at most two), next to the loss and grad-norm scalars. The only other
    traffic is DDP's one-time bucket rebuild at the start of the second step (this recorded one): two broadcasts of
    bucket indices and sizes, a few hundred bytes."""
    _cfg, record = measured["dp2-replicate"]
    ops = record["comm_ops"]
    assert set(ops) <= {"dp/all_reduce", "dp/broadcast"}, ops
    assert ops["dp/all_reduce"]["count"] <= 4, ops
    assert ops.get("dp/broadcast", {"wire": 0})["wire"] <= 1024, ops

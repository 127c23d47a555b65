"""`hpcmega bench` machinery on its smallest selections: real runs, ratios against the baselines it measured, the
explicit-TP reference next to hpcmega's TP, and the goal computed relative to that reference."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from hpcmega.bench.cases import BenchCase, default_cases, ideal_pp_ratio, select
from hpcmega.bench.runner import baseline_disagreement, rows_from_times


def test_bench_measures_ratios_against_its_own_baselines():
    r = run_cli(["bench", "--only", "tp=2 (DTensor", "--steps", "1", "--warmup", "1", "--json"], timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"single B=4", "explicit TP tp=2", "tp=2 (DTensor TP+SP)"}  # baseline and reference kept
    tp, ref, single = rows["tp=2 (DTensor TP+SP)"], rows["explicit TP tp=2"], rows["single B=4"]
    assert tp["ms_min"] <= tp["ms_median"] <= tp["ms_max"]
    assert tp["ratio"] == pytest.approx(tp["ms_median"] / single["ms_median"])
    assert ref["ratio"] == pytest.approx(ref["ms_median"] / single["ms_median"])
    assert tp["goal"] == pytest.approx(1.10 * ref["ratio"])
    assert single["ratio"] is None and single["met"] is None


def test_goals_relative_to_a_reference_and_to_the_ideal_bubble():
    cases = [BenchCase("one", 1, {"train.global_batch": 4}),
             BenchCase("ref", 2, {"train.global_batch": 4}, "one", kind="explicit-tp"),
             BenchCase("x", 2, {"train.global_batch": 4}, "one", goal=1.10, goal_ref="ref")]
    rows = {r["name"]: r for r in rows_from_times(cases, {"one": [1.0, 1.2, 0.9], "ref": [0.6], "x": [0.7, 0.65]})}
    assert rows["one"]["ms_median"] == pytest.approx(1000) and rows["one"]["ms_max"] == pytest.approx(1200)
    assert rows["x"]["goal"] == pytest.approx(0.66) and rows["x"]["ratio"] == pytest.approx(0.675)
    assert rows["x"]["met"] is False
    assert ideal_pp_ratio(2, "1f1b", 1, 8) == pytest.approx(9 / 16)  # (m + p - 1) / (m p)
    assert baseline_disagreement(list(rows.values())) == 0.0  # one baseline only

    two = [BenchCase("B=4", 1, {"train.global_batch": 4}), BenchCase("B=32", 1, {"train.global_batch": 32})]
    # 8x the batch in 10x the time: the B=32 run is 25% slower per token than B=4 -> flagged
    assert baseline_disagreement(rows_from_times(two, {"B=4": [1.0], "B=32": [10.0]})) == pytest.approx(0.25)
    assert {c.name for c in select(default_cases(), ("dp=2 (FSDP2)",))} == {
        "single B=8", "DDP dp=2", "dp=2 (FSDP2)"}


def test_pp_cases_divide_by_one_process_on_the_same_batch_and_zbv_must_beat_1f1b_where_the_bubble_dominates():
    cases = {c.name: c for c in default_cases()}
    pp_cases = [c for c in cases.values() if c.overrides.get("parallel.pp", 1) > 1]
    assert len(pp_cases) == 5
    for c in pp_cases:
        base = cases[c.baseline]
        assert base.nproc == 1 and base.global_batch == c.global_batch, c.name
    assert ideal_pp_ratio(2, "1f1b", 1, 2) == pytest.approx(3 / 4)
    zbv = cases["pp=2 zbv m=2"]
    assert zbv.goal_ref == "pp=2 1f1b m=2" and zbv.goal < 1.0
    assert {c.name for c in select(default_cases(), ("zbv m=2",))} == {"single B=8", "pp=2 1f1b m=2", "pp=2 zbv m=2"}


def test_bench_rejects_an_unknown_selection():
    r = run_cli(["bench", "--only", "nothing-like-this"])
    assert r.returncode == 2 and "matches no case" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --gpu would run the GPU bench")
def test_bench_gpu_refuses_without_a_gpu():
    r = run_cli(["bench", "--gpu"])
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


def test_pp_profile_accounts_every_stage_call_of_the_split_backward():
    from hpcmega.bench.pp_profile import profile

    tiny = {"model.d_model": 64, "model.n_heads": 4, "model.n_layers": 4, "model.vocab_size": 128,
            "model.max_seq_len": 32, "train.seq_len": 32, "train.micro_batch": 1}
    ranks = profile("zbv", microbatches=2, steps=1, warmup=0, model=tiny)
    for (step,) in ranks:  # zbv: 2 stages per rank, each does F, I and W once per microbatch; no full backward
        assert {p: step[p]["calls"] for p in ("forward", "backward_input", "backward_weight")} == {
            "forward": 4, "backward_input": 4, "backward_weight": 4}
        assert "backward" not in step
        parts = sum(step[p]["wall"] for p in step if p != "step")
        assert parts == pytest.approx(step["step"]["wall"])  # the remainders close the sum: nothing double counted
        assert 0 < step["step"]["cpu"] <= step["step"]["wall"] * 1.05


def test_tp_blocks_compute_on_local_shards_like_explicit_tp():
    """hpcmega tp=2 keeps DTensor parameters but runs its blocks on local shards: per step it dispatches about as
    many matmuls as the hand-written explicit TP (only the vocab-parallel head still runs on DTensors; a block on
    DTensors counts each matmul twice, the DTensor op and the local one)."""
    from hpcmega.bench.tp_profile import profile

    tiny = {"model.d_model": 64, "model.n_heads": 4, "model.n_layers": 4, "model.vocab_size": 128,
            "model.max_seq_len": 32, "train.seq_len": 32, "train.micro_batch": 4}
    rank0, rank1 = profile(steps=1, warmup=1, model=tiny)
    explicit, hpc = rank0["explicit TP"]["counts"], rank0["hpcmega tp=2"]["counts"]
    assert explicit["matmul_dispatch"] == 4 * 18 + 3  # 6 matmuls per block forward, 12 backward; the head's 3
    assert explicit["matmul_dispatch"] <= hpc["matmul_dispatch"] <= explicit["matmul_dispatch"] + 3, (explicit, hpc)
    assert rank1["hpcmega tp=2"]["counts"] == {} and len(rank1["hpcmega tp=2"]["cpu_s"]) == 1

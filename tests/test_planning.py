"""The pure planner: published formulas reproduced, the fit check and its suggested fix, `plan --auto`.

Everything here is arithmetic on a Config (no torch), so these tests run in milliseconds. The estimator's agreement
with the real engine is tested in test_planning_measure.py.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hpcmega.cli import main
from hpcmega.config import load_config
from hpcmega.planning.check import check_memory, suggest_fixes
from hpcmega.planning.estimate import (
    GIB,
    Shape,
    activation_bytes_per_layer,
    estimate,
    hardware_flops_per_step,
    korthikanti_bytes_per_layer,
    pp_sends,
    rank_memory,
    total_params,
    wire_bytes,
)
from hpcmega.gpus import get_gpu, gpu_for_device_name
from hpcmega.planning.schedule_facts import bubble_fraction, chunks_in_flight

# GPT-3 175B as in Korthikanti et al. (2022) and Narayanan et al. (2021).
S, H, A, L, T, P, V = 2048, 12288, 96, 96, 8, 8, 50304


def gpt3(**overrides) -> Shape:
    """GPT-3 175B on 16 nodes x 8 GPUs, t=8, p=8 (dp=2), global batch 1536."""
    cfg = load_config(None, {"model.preset": "gpt3-175b", "cluster.nodes": 16, "cluster.gpus_per_node": 8,
                             "parallel.tp": T, "parallel.pp": P, "train.seq_len": S, "train.global_batch": 1536,
                             "train.micro_batch": 1, "train.precision": "bf16", "parallel.recompute": "none",
                             **overrides})
    return Shape.from_config(cfg)


@pytest.mark.parametrize("sp, recompute, table2", [
    (False, "none", lambda sbh, b: sbh * (10 + 24 / T + 5 * A * S / (H * T))),
    (True, "none", lambda sbh, b: sbh * (34 / T + 5 * A * S / (H * T))),
    (False, "selective", lambda sbh, b: sbh * (10 + 24 / T)),
    (True, "selective", lambda sbh, b: sbh * 34 / T),
    (True, "full", lambda sbh, b: sbh * 2),
])
def test_korthikanti_table2_rows_for_gpt3_175b(sp, recompute, table2):
    for b in (1, 4):
        assert korthikanti_bytes_per_layer(S, b, H, A, T, sp, recompute) == pytest.approx(table2(S * b * H, b))
    assert korthikanti_bytes_per_layer(S, 1, H, A, 1, False, "none") == pytest.approx(S * H * (34 + 5 * A * S / H))


def test_engine_activations_are_table2_without_dropout_and_s2_terms():
    """hpcmega's recompute=none in bf16 is Table 2 minus the dropout masks (no dropout) and the s^2 attention terms
    (SDPA), plus a fp32 log-sum-exp; with SP, DTensor keeps the two gathered matmul inputs at full sequence."""
    sbh, lse = S * H, 4 * S * A // T
    no_sp = activation_bytes_per_layer(gpt3(**{"parallel.sequence_parallel": False}), "none")
    assert no_sp == pytest.approx(sbh * (10 + 24 / T) - 2 * sbh + lse)
    with_sp = activation_bytes_per_layer(gpt3(), "none")
    assert with_sp == pytest.approx(sbh * 34 / T - 2 * sbh / T + 4 * sbh * (1 - 1 / T) + lse)
    assert activation_bytes_per_layer(gpt3(), "full") == sbh * 2 // T  # the block input, sequence-sharded
    assert with_sp < no_sp


def _replay_zbv(p: int, m: int) -> tuple[int, int]:
    """(step time, busy time per rank) of torch's own ZBV action lists, every action one time unit, each waiting
    for its cross-stage input (F after the previous stage's F, I after the next stage's I, W after its I)."""
    from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble

    sched = ScheduleZBVZeroBubble.__new__(ScheduleZBVZeroBubble)  # only the list builder, no stages needed
    sched.pp_group_size, sched._n_microbatches, sched.num_stages = p, m, 2 * p
    lists = {r: [a for a in sched._calculate_single_rank_operations(r) if a is not None] for r in range(p)}
    done: dict[tuple, int] = {}
    clock, pos = [0] * p, [0] * p
    while any(pos[r] < len(lists[r]) for r in range(p)):
        moved = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                a = lists[r][pos[r]]
                kind = {"FORWARD": "F", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}[a.computation_type.name]
                s, j = a.stage_index, a.microbatch_index
                needs = {"F": [("F", s - 1, j)] if s else [],
                         "I": [("F", s, j)] + ([("I", s + 1, j)] if s < 2 * p - 1 else []),
                         "W": [("I", s, j)]}[kind]
                if any(n not in done for n in needs):
                    break
                clock[r] = done[(kind, s, j)] = max([clock[r]] + [done[n] for n in needs]) + 1
                pos[r] += 1
                moved = True
        assert moved, "the replay deadlocked"
    return max(clock), 6 * m


@pytest.mark.parametrize("p,m", [(2, 8), (2, 2), (3, 6), (4, 4), (4, 16), (8, 24)])
def test_zbv_bubble_is_that_of_torchs_own_schedule(p, m):
    step, busy = _replay_zbv(p, m)
    assert bubble_fraction("zbv", p, 2, m) == pytest.approx((step - busy) / step)
    if (p, m) == (2, 8):
        assert (step - busy, step) == (1, 49)  # the interleaved bound would say 1/17


def test_narayanan_bubble_and_in_flight_microbatches():
    sh = gpt3()
    assert sh.m == 768  # 1536 / (dp 2 x micro-batch 1)
    assert estimate(sh).bubble == pytest.approx((P - 1) / (768 + P - 1))
    inter = gpt3(**{"parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2})
    assert estimate(inter).bubble == pytest.approx((P - 1) / (2 * 768 + P - 1))
    assert bubble_fraction("gpipe", P, 1, 8) == pytest.approx(7 / 15)
    # 1F1B: stage r holds p - r microbatches; GPipe all m; interleaved rank 0: p(1 + (p-1)/(p v)) rank-microbatches.
    assert [chunks_in_flight("1f1b", P, r, 1, 768) for r in (0, 3, 7)] == [8, 5, 1]
    assert chunks_in_flight("gpipe", P, 0, 1, 32) == 32
    for v in (2, 4):
        chunks = chunks_in_flight("interleaved-1f1b", P, 0, v, 64)
        assert chunks / v == pytest.approx(P * (1 + (P - 1) / (P * v)))


def test_narayanan_flops_and_parameter_formulas():
    sh = gpt3()
    B = 1536
    est = estimate(sh)
    assert est.tokens_per_step == B * S
    assert est.flops_per_step == pytest.approx(72 * B * L * S * H**2 * (1 + S / (6 * H) + V / (12 * H * L)))
    n = 12 * L * H**2 + V * H  # 6N + 12 L h s per token
    assert est.flops_per_step == pytest.approx(B * S * (6 * n + 12 * L * H * S))
    full = gpt3(**{"parallel.recompute": "full"})
    assert hardware_flops_per_step(full) == pytest.approx(96 * B * S * L * H**2 * (1 + S / (6 * H) + V / (16 * L * H)))
    # Narayanan eq. 2 counts a tied head; hpcmega's head is untied and has a final LayerNorm.
    eq2 = 12 * L * H**2 * (1 + 13 / (12 * H) + (V + S) / (12 * L * H))
    assert total_params(sh) - V * H - 2 * H == pytest.approx(eq2)


def test_stage_parameters_add_up_to_the_model():
    sh = gpt3(**{"parallel.tp": 1, "cluster.nodes": 2, "parallel.pp": 8, "train.global_batch": 16})
    assert sum(rank_memory(sh, r).param_count for r in range(8)) == total_params(sh)
    first, last = rank_memory(sh, 0), rank_memory(sh, 7)
    assert first.param_count - last.param_count == (S - V) * H - 2 * H + V * H  # pos_emb + tok_emb vs head


def test_comm_bytes_follow_ring_volumes():
    sh = gpt3()
    comm = estimate(sh).comm
    e, sbh, ring = 2, sh.b * S * H, 2 * (T - 1) / T
    # Narayanan 3.2: 4 all-reduces of b*s*h per layer and microbatch; the first stage (the busiest rank) adds the
    # token (b*s*h) and position (s*h) embeddings; under SP the gradients of each block's two LayerNorms (4h) and of
    # its row-parallel biases (wo, fc2: 2h), partial sums over tp, are reduced once per step in fp32 -- after FSDP2's
    # reduce-scatter over dp, so this rank's 1/dp of them.
    first_stage = 4 * sbh * (L // P) + sbh + S * H
    assert comm["tp"] == int(ring * first_stage * e * sh.m + ring * 4 * (6 * H * (L // P) // sh.dp))
    assert comm["pp"] == 2 * sbh * e // T * sh.m  # a middle rank: activations forward + gradients backward
    per_rank = rank_memory(sh, 0).param_count
    assert comm["dp"] == int((sh.dp - 1) / sh.dp * per_rank * (e + 4))  # one bf16 all-gather, one fp32 reduce-scatter


def test_replicate_holds_the_full_model_and_all_reduces_gradients_once():
    """data_parallel = replicate (plain DDP, tp = pp = 1): nothing divided by dp, DDP's gradient buckets held
    through backward, and dp traffic is one fp32 ring all-reduce of every gradient, 2(n-1)/n x 4P."""
    over = {"cluster.nodes": 1, "cluster.gpus_per_node": 8, "parallel.tp": 1, "parallel.pp": 1,
            "model.preset": "gpt2-350m", "train.global_batch": 64, "train.micro_batch": 4}
    fsdp = Shape.from_config(load_config(overrides={**over, "train.precision": "fp32"}))
    rep = Shape.from_config(load_config(overrides={**over, "train.precision": "fp32",
                                                   "parallel.data_parallel": "replicate"}))
    P = total_params(rep)
    mem = rank_memory(rep, 0)
    assert (mem.params, mem.grads, mem.optimizer) == (4 * P, 4 * P, 8 * P)
    assert mem.peak >= 16 * P + mem.activations
    assert rank_memory(fsdp, 0).params == 4 * P // 8
    assert estimate(rep).comm == {"tp": 0, "pp": 0, "dp": int(2 * 7 / 8 * 4 * P)}
    bf16 = Shape.from_config(load_config(overrides={**over, "train.precision": "bf16",
                                                    "parallel.data_parallel": "replicate"}))
    assert rank_memory(bf16, 0).buffers - rank_memory(rep, 0).buffers >= 2 * P  # autocast's bf16 weight copies


def test_zero2_gathers_once_per_step_zero3_per_microbatch():
    over = {"cluster.nodes": 1, "cluster.gpus_per_node": 8, "model.preset": "gpt2-350m", "train.global_batch": 64,
            "train.micro_batch": 2, "train.precision": "bf16"}  # m = 4 microbatches per rank
    P = total_params(Shape.from_config(load_config(overrides=over)))
    zero3 = estimate(Shape.from_config(load_config(overrides=over))).comm["dp"]
    zero2 = estimate(Shape.from_config(load_config(overrides={**over, "parallel.reshard_after_forward": False})))
    # bf16 gathered in forward and backward of 4 microbatches, an fp32 reduce-scatter after each (the default)
    assert zero3 == int(7 / 8 * P * (2 * 4 * 2 + 4 * 4))
    assert zero2.comm["dp"] == int(7 / 8 * P * (2 + 4))  # one bf16 gather, one fp32 reduce-scatter


def test_zero3_accumulation_reduces_every_microbatch_unless_told_to_wait():
    """pp = 1, m = 4, ZeRO-3: by default every microbatch's gradients are reduce-scattered into their fp32 shards
    (4 reduce-scatters; nothing unsharded outlives a backward); ``reduce_every_microbatch = false`` keeps an fp32
    unsharded accumulator for the whole rank instead and reduces once: 3 x 4P bytes less traffic, 4P more memory
    (less the shards that already exist). Inside a pipeline the option has no effect."""
    over = {"cluster.nodes": 1, "cluster.gpus_per_node": 8, "model.preset": "gpt2-350m", "train.global_batch": 64,
            "train.micro_batch": 2, "train.precision": "bf16"}
    every = Shape.from_config(load_config(overrides=over))
    once = Shape.from_config(load_config(overrides={**over, "parallel.reduce_every_microbatch": False}))
    assert every.reduce_every_microbatch and not once.reduce_every_microbatch
    P = total_params(every)
    assert estimate(every).comm["dp"] - estimate(once).comm["dp"] == int(7 / 8 * P * 4 * 3)
    e, o = rank_memory(every, 0), rank_memory(once, 0)
    assert o.buffers - e.buffers > 0.9 * 4 * P  # the whole rank's fp32 gradient vs two blocks'
    assert o.peak - e.peak > 0.9 * 4 * P * 7 / 8  # minus the fp32 shards that exist from the first microbatch on
    piped = {**over, "parallel.pp": 2, "parallel.reduce_every_microbatch": True}
    assert not Shape.from_config(load_config(overrides=piped)).reduce_every_microbatch


def test_pipeline_sends_follow_stage_placement():
    two = gpt3(**{"parallel.pp": 2, "parallel.schedule": "1f1b"})
    assert [pp_sends(two, r) for r in range(2)] == [1, 1]  # activations one way, gradients the other
    inter = gpt3(**{"parallel.pp": 2, "parallel.schedule": "interleaved-1f1b", "parallel.virtual_stages": 2})
    assert [pp_sends(inter, r) for r in range(2)] == [3, 3]  # 4 stages: 3 boundaries each way, all cross ranks
    assert [pp_sends(gpt3(), r) for r in (0, 3, 7)] == [1, 2, 1]
    assert wire_bytes("all_reduce", 100, 4) == 150 and wire_bytes("all_gather", 100, 4) == 75
    assert wire_bytes("send", 100, 2) == 100 and wire_bytes("recv", 100, 2) == 0 and wire_bytes("all_reduce", 9, 1) == 0


def test_gpu_table_lookups():
    assert get_gpu("H100").bf16_tflops == 989.0 and get_gpu("h100-sxm") is get_gpu("h100")
    assert gpu_for_device_name("NVIDIA H100 80GB HBM3").name == "h100"
    assert gpu_for_device_name("NVIDIA H100 PCIe").name == "h100-pcie"
    assert gpu_for_device_name("NVIDIA GH200 480GB").name == "gh200"
    assert gpu_for_device_name("NVIDIA A100-SXM4-40GB").name == "a100-40"
    assert gpu_for_device_name("Tesla T4") is None
    with pytest.raises(ValueError, match="unknown GPU 'k80'; use one of"):
        get_gpu("k80")


# -- the fit check, through the CLI ---------------------------------------------------------------------------------
SEVEN_B = ["plan", "--model", "gpt-7b", "--nodes", "4", "--gpus-per-node", "8", "--tp", "8", "--pp", "2",
           "--gpu", "h100"]
BIG_ON_ONE_NODE = ["plan", "--model", "gpt3-175b", "--nodes", "1", "--gpus-per-node", "8", "--tp", "8",
                   "--gpu", "h100"]


def test_plan_json_has_per_stage_memory_and_fits():
    result = CliRunner().invoke(main, SEVEN_B + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    mem = data["memory"]
    assert mem["gpu"] == "h100" and mem["gpu_mem_gib"] == get_gpu("h100").memory_gib and mem["fits"] is True
    assert [s["stage"] for s in mem["stages"]] == [0, 1]
    assert set(mem["stages"][0]) == {"stage", "params_gib", "grads_gib", "optimizer_gib", "activations_gib",
                                     "peak_gib"}
    assert mem["peak_gib"] == max(s["peak_gib"] for s in mem["stages"])
    assert mem["stages"][0]["optimizer_gib"] == pytest.approx(2 * mem["stages"][0]["params_gib"], abs=2e-3)
    assert set(data["activation_bytes_per_layer"]) == {"none", "selective", "full"}
    assert 0 < data["bubble"] < 1 and data["flops_per_step"] > 0 and data["est_step_s"] > 0
    assert data["tokens_per_step"] == data["config"]["global_batch"] * data["config"]["seq_len"]
    assert set(data["comm_bytes_per_step"]) == {"tp", "pp", "dp"}


def test_plan_refuses_175b_on_one_node_and_the_fix_it_names_fits():
    result = CliRunner().invoke(main, BIG_ON_ONE_NODE)
    assert result.exit_code == 2
    msg = result.output.strip().splitlines()[-1]
    assert "needs" in msg and "GiB per GPU on stage 0" in msg and "h100 has 79.1 GiB" in msg and "try --nodes" in msg
    fix = msg.split("try ", 1)[1].split(" (--no-memory-check")[0].split()
    fixed = CliRunner().invoke(main, BIG_ON_ONE_NODE + fix + ["--json"])
    assert fixed.exit_code == 0, fixed.output
    assert json.loads(fixed.output)["memory"]["fits"] is True


def test_single_flag_fixes_are_offered_first_and_each_one_fits():
    cfg = load_config(None, {"model.preset": "gpt-7b", "cluster.nodes": 1, "cluster.gpus_per_node": 8,
                             "train.seq_len": 2048, "train.global_batch": 64, "train.micro_batch": 8,
                             "cluster.gpu": "h100", "train.precision": "bf16", "parallel.recompute": "none"})
    verdict = check_memory(cfg)
    assert verdict.error and "try --recompute selective, or --micro-batch 4" in verdict.error
    for fix in suggest_fixes(cfg):
        flag, value = fix.split()
        key = {"--recompute": "parallel.recompute", "--micro-batch": "train.micro_batch"}[flag]
        fixed = load_config(None, {"model.preset": "gpt-7b", "cluster.nodes": 1, "cluster.gpus_per_node": 8,
                                   "train.seq_len": 2048, "train.global_batch": 64, "train.micro_batch": 8,
                                   "train.precision": "bf16", "parallel.recompute": "none", key: value})
        assert check_memory(fixed).error is None


def test_no_memory_check_says_so_and_cpu_jobs_are_not_checked():
    skipped = CliRunner().invoke(main, BIG_ON_ONE_NODE + ["--no-memory-check"])
    assert skipped.exit_code == 0, skipped.output
    assert "memory check skipped (--no-memory-check)" in skipped.output
    cpu = CliRunner().invoke(main, BIG_ON_ONE_NODE + ["--cpu"])
    assert cpu.exit_code == 0, cpu.output
    assert "CPU job: no GPU memory check" in cpu.output


def test_above_90_percent_warns_and_gpu_mem_override_is_used():
    peak = json.loads(CliRunner().invoke(main, SEVEN_B + ["--json"]).output)["memory"]["peak_gib"]
    tight = CliRunner().invoke(main, SEVEN_B + ["--json", "--gpu-mem-gib", str(round(peak / 0.95, 2))])
    data = json.loads(tight.output)
    assert data["memory"]["fits"] is True and data["memory"]["gpu_mem_gib"] == round(peak / 0.95, 2)
    assert any("little room" in w for w in data["warnings"])
    refused = CliRunner().invoke(main, SEVEN_B + ["--gpu-mem-gib", str(round(peak * 0.9, 2))])
    assert refused.exit_code == 2 and "try " in refused.output


def test_submit_runs_the_same_check_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["submit", *BIG_ON_ONE_NODE[1:], "--run-dir", str(run_dir), "--dry-run"])
    assert result.exit_code == 2 and "GiB per GPU" in result.output
    assert not run_dir.exists()


def test_plan_auto_lists_fitting_layouts_with_tp_inside_a_node_fastest_first():
    args = ["plan", "--auto", "--model", "gpt-7b", "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    layouts = json.loads(result.output)["layouts"]
    assert len(layouts) > 5
    assert all(lay["memory"]["fits"] and lay["memory"]["peak_gib"] <= 79.1 for lay in layouts)
    assert all(8 % lay["tp"] == 0 and lay["tp"] * lay["pp"] * lay["dp"] == 32 for lay in layouts)
    times = [lay["est_step_s"] for lay in layouts]
    assert times == sorted(times)
    assert {lay["recompute"] for lay in layouts} == {"none", "selective", "full"}
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and f"{len(layouts)} layouts fit gpt-7b" in table.output
    assert table.output.count("--tp ") == 5
    # The best layout, typed back into plan, fits.
    best = CliRunner().invoke(main, args[:1] + args[2:] + layouts[0]["flags"].split() + ["--json"])
    assert best.exit_code == 0 and json.loads(best.output)["memory"]["fits"] is True


def test_plan_auto_with_nothing_that_fits_exits_2_naming_more_nodes():
    result = CliRunner().invoke(main, ["plan", "--auto", "--model", "gpt3-175b", "--nodes", "1",
                                       "--gpus-per-node", "8", "--gpu", "a100-40", "--global-batch", "512"])
    assert result.exit_code == 2 and "try --nodes" in result.output

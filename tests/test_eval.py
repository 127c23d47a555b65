"""Evaluation: `val_loss` on the held-out split is layout-invariant (one process vs tp2, dp2 and pipeline schedules,
within 1e-5), does not disturb training, and reaches metrics.jsonl, the console and W&B through `hpcmega run`."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli
from engine_harness import Layout, run_layouts, spawn
from test_invariance import tiny_config
from wandb_reader import read_history

pytestmark = pytest.mark.slow

VAL_ATOL = 1e-5
EVAL = {"train.steps": 3, "train.eval_every": 2, "train.eval_batches": 2}
TWO_RANKS = {
    "tp2": {"parallel.tp": 2},
    "dp2": {},
    "pp2-1f1b": {"parallel.pp": 2, "parallel.schedule": "1f1b"},
    "pp2-zbv": {"parallel.pp": 2, "parallel.schedule": "zbv"},  # two stages per rank, V-shaped
}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def layouts(tmp_path, named: dict[str, dict]) -> list[Layout]:
    return [Layout(name, tiny_config(**EVAL, **overrides), str(tmp_path / name)) for name, overrides in named.items()]


def test_val_loss_is_the_same_in_every_layout_and_leaves_training_alone(tmp_path):
    spawn(1, run_layouts, layouts(tmp_path, {"single": {}}))
    spawn(2, run_layouts, layouts(tmp_path, TWO_RANKS))
    reference = metrics(tmp_path / "single")
    evals = {r["step"]: r["val_loss"] for r in reference if "val_loss" in r}
    assert sorted(evals) == [2, 3]  # every 2 steps and the last
    assert all(abs(evals[s] - r["loss"]) > 1e-3 for r in reference for s in evals if r["step"] == s)  # not train
    for name in TWO_RANKS:
        records = metrics(tmp_path / name)
        got = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
        assert sorted(got) == [2, 3], name
        for step, value in evals.items():
            assert abs(got[step] - value) <= VAL_ATOL, (name, step, got[step], value)
        for mine, ref in zip(records, reference, strict=True):  # eval between steps changes no training step
            assert abs(mine["loss"] - ref["loss"]) <= 1e-5 * ref["loss"], (name, mine["step"])


def test_run_logs_val_loss_to_metrics_console_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["run", "--nproc", "2", "--pp", "2", "--steps", "3", "--eval-every", "2", "--eval-batches", "1",
                      "--global-batch", "4", "--seq-len", "32", "--log-every", "10", "--wandb", "offline",
                      "--run-dir", run_dir], env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stdout + result.stderr
    logged = {r["step"]: r.get("val_loss") for r in metrics(run_dir)}
    assert logged[1] is None and logged[2] is not None and logged[3] is not None  # every 2 steps and the last
    assert "step 2/3 | loss" in result.stdout and f"val_loss {logged[2]:.4f}" in result.stdout
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    _, rows = read_history(wandb_file)
    assert {row["_step"]: row.get("val_loss") for row in rows} == logged

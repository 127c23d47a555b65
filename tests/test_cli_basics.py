"""The CLI entry points users hit first: `hpcmega --help`, `hpcmega plan` (table and --json), bad input -> exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcmega.cli import main

HEADLINE = ["plan", "--nodes", "4", "--gpus-per-node", "8", "--tp", "8", "--pp", "2", "--model", "gpt-7b"]
LAYOUT_KEYS = {"world_size", "tp", "pp", "dp", "order", "tp_groups", "pp_groups", "dp_groups", "mesh_grid",
               "rank_coords", "domains", "warnings", "config",
               # the planner's estimate (tests/test_planning.py)
               "memory", "activation_bytes_per_layer", "bubble", "flops_per_step", "tokens_per_step", "est_step_s",
               "comm_bytes_per_step"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def hpcmega_exe() -> str:
    exe = Path(sys.executable).parent / "hpcmega"
    return str(exe) if exe.exists() else shutil.which("hpcmega")


def test_plan_json_schema_for_the_headline_layout():
    result = CliRunner().invoke(main, HEADLINE + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == LAYOUT_KEYS
    assert (data["world_size"], data["tp"], data["pp"], data["dp"], data["order"]) == (32, 8, 2, 2, "tp-dp-pp")
    assert data["tp_groups"] == [list(range(i, i + 8)) for i in range(0, 32, 8)]
    assert sorted(data["pp_groups"]) == sorted([r, r + 16] for r in range(16))
    assert len(data["rank_coords"]) == 32
    assert data["rank_coords"][9] == {"node": "node2", "local_rank": 1, "tp": 1, "pp": 0, "dp": 1}
    assert data["mesh_grid"][1][0] == list(range(16, 24))
    assert data["config"]["model"] == "gpt-7b" and data["config"]["microbatches"] == 1024
    assert data["config"]["layers_per_stage"] == 16 and data["warnings"] == []


def test_plan_table_shows_groups_and_nodes_they_span():
    result = CliRunner().invoke(main, HEADLINE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tp=8  pp=2  dp=2" in out
    assert "TP groups (4 of size 8)" in out and "PP groups (16 of size 2)" in out and "DP groups (16 of size 2)" in out
    assert "node1, node3" in out  # a pipeline crosses nodes
    assert "checks passed" in out


def test_plan_previews_cyclic_distribution_and_real_node_names():
    result = CliRunner().invoke(main, ["plan", "--nodes", "2", "--gpus-per-node", "4", "--tp", "4",
                                       "--placement", "cyclic", "--node-names", "gpu-a,gpu-b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tp_groups"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [c["node"] for c in data["rank_coords"][:3]] == ["gpu-a", "gpu-b", "gpu-a"]
    assert any("not block-placed" in w for w in data["warnings"])


def test_plan_warns_about_a_large_pipeline_bubble():
    result = CliRunner().invoke(main, ["plan", "--gpus-per-node", "4", "--pp", "4", "--global-batch", "4"])
    assert result.exit_code == 0, result.output
    assert "warning: pipeline bubble ~43%" in result.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["plan", "--nodes", "4", "--gpus-per-node", "8", "--tp", "8", "--heads", "4"], ["n_heads=4", "--model"]),
        (["plan", "--nodes", "4", "--gpus-per-node", "1", "--tp", "8", "--pp", "2"], ["--gpus-per-node 8"]),
        (["plan", "--nodes", "2", "--gpus-per-node", "4", "--tp", "8"], ["a TP group would cross a node"]),
        (["plan", "--nodes", "2", "--gpus-per-node", "4", "--tp", "3"], ["does not divide the world size 8"]),
        (["plan", "--steps", "0"], ["train.steps (--steps)=0 must be positive"]),
        (["plan", "--nodes", "2", "--node-names", "a,b,c"], ["--node-names lists 3 names but --nodes is 2"]),
        (["plan", "--config", "missing.toml"], ["not found"]),
        (["plan", "--placement", "plane"], ["'plane' is not one of"]),
        (["plan", "--gpus-per-node", "2", "--pp", "2", "--schedule", "zbv", "--virtual-stages", "3"],
         ["--virtual-stages 2"]),
    ],
)
def test_bad_plan_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == result.output.rstrip("\n").splitlines()[-1]
    for word in words:
        assert word in errors[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args, words",
    [
        (["ls", "empty"], ["no run folders under empty"]),
        (["status", "empty"], ["empty is not a run folder"]),
        (["plot", "empty"], ["empty is not a run folder"]),
        (["ckpt", "ls", "empty"], ["no checkpoints", "empty"]),
        (["bench", "--comm", "--gpu"], ["--comm and --gpu measure different things"]),
        (["submit", "--after", "soon", "--dry-run"], ["--after 'soon'"]),
    ],
)
def test_bad_values_in_any_command_exit_2_with_one_line_and_no_usage(tmp_path, monkeypatch, args, words):
    """Every command refuses a bad value the same way (ConfigError): one line on stderr, no usage text."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr
    assert "Usage:" not in result.output
    for word in words:
        assert word in result.stderr
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_bad_toml_value_exits_2(tmp_path, monkeypatch):
    conf = tmp_path / "bad.toml"
    conf.write_text('[parallel]\nschedule = "zigzag"\n')
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(main, ["plan", "--config", str(conf)])
    assert result.exit_code == 2 and "unknown parallel.schedule (--schedule) 'zigzag'" in result.output
    assert os.listdir(work) == []


def test_real_subprocess_plan_json_and_refusal(tmp_path):
    exe = hpcmega_exe()
    ok = subprocess.run([exe, *HEADLINE, "--json"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert set(data) == LAYOUT_KEYS and data["dp"] == 2
    bad = subprocess.run([exe, "plan", "--nodes", "2", "--gpus-per-node", "4", "--tp", "8"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.rstrip("\n").splitlines()[-1] == (
        "Error: tp=8 does not divide gpus_per_node=4: a TP group would cross a node; use --tp 4 (or 2, 1)")
    assert os.listdir(tmp_path) == []


def test_help_and_plan_do_not_import_heavy_packages(tmp_path):
    code = (
        "import sys, hpcmega.cli\n"
        "heavy = ('torch', 'wandb', 'submitit')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "try:\n"
        "    hpcmega.cli.main(['plan', '--nodes', '2', '--gpus-per-node', '4', '--tp', '4', '--json'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "[]" and lines[-1] == "[]"
    assert json.loads("\n".join(lines[1:-1]))["tp"] == 4


def test_hpcmega_help_lists_plan():
    proc = subprocess.run([hpcmega_exe(), "--help"], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "plan" in proc.stdout and "Usage: hpcmega" in proc.stdout
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "--placement" in result.output and "--node-names" in result.output

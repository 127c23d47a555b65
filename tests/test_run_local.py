"""`hpcmega run --nproc N`: real rank processes (gloo on CPU) through the same entry point as a SLURM task."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import popen_cli, process_env, run_cli

from hpcmega.config import load_config
from hpcmega.planning.layout import Layout, block_placement, compute_layout


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_run_writes_config_and_layout_and_trains(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["run", "--nproc", "4", "--tp", "2", "--pp", "2", "--steps", "2", "--global-batch", "4",
                      "--seq-len", "32", "--wandb", "disabled", "--run-dir", run_dir], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run folder: {run_dir}" in result.stdout
    assert "collectives self-test passed" in result.stdout  # rank 0's output is streamed

    cfg = load_config(run_dir / "config.toml")
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.train.steps) == (2, 2, 2)
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node, cfg.cluster.cpu) == (1, 4, True)
    assert cfg.run_dir == str(run_dir)

    data = json.loads((run_dir / "layout.json").read_text())
    layout = Layout.from_json(data)  # the schema of `plan --json`, consistent with its own coordinates
    assert data["tp_groups"] == [[0, 1], [2, 3]]
    assert data["pp_groups"] == [[0, 2], [1, 3]]
    assert data["dp_groups"] == [[0], [1], [2], [3]]
    assert data["mesh_grid"] == [[[0, 1]], [[2, 3]]]
    assert {c["node"] for c in data["rank_coords"]} == {socket.gethostname()}
    assert [c["local_rank"] for c in data["rank_coords"]] == [0, 1, 2, 3]
    assert layout.same_groups(compute_layout(block_placement(1, 4), tp=2, pp=2))  # what `plan` showed

    # training ran on the mesh built from that layout: one metrics line per step
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    for rank in range(4):
        assert (run_dir / "logs" / f"rank{rank}.log").exists()


def test_bad_config_exits_2_and_writes_nothing(tmp_path):
    result = run_cli(["run", "--nproc", "3", "--tp", "2", "--run-dir", tmp_path / "run"], cwd=tmp_path)
    assert result.returncode == 2
    assert "tp" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_dead_rank_stops_the_run_quickly(tmp_path):
    """A rank that dies mid-training of a native crash (SIGSEGV): the others are stopped, `run` exits non-zero, no
    rank process is left behind, and the dead rank's log shows where it crashed (every thread's Python stack). Uses
    the default run folder (runs/<time>-<name> under the working directory)."""
    log = tmp_path / "run.out"
    proc = popen_cli(["run", "--nproc", "4", "--tp", "2", "--pp", "2", "--steps", "100000", "--global-batch", "4",
                      "--seq-len", "32", "--wandb", "disabled"], output=log, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        metrics = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("runs/*/metrics.jsonl"))
            if found and found[0].read_text().count("\n") >= 1:
                metrics = found[0]
                break
            time.sleep(0.2)
        assert metrics is not None, "training never started:\n" + log.read_text()
        ranks = {int(process_env(pid).get("RANK", -1)): pid for pid in _children(proc.pid)}
        assert sorted(ranks) == [0, 1, 2, 3]

        killed_at = time.monotonic()
        os.kill(ranks[2], signal.SIGSEGV)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode != 0
    assert elapsed < 20, f"run took {elapsed:.1f}s to notice the dead rank"
    assert "rank 2 failed (killed by SIGSEGV)" in output
    run_dir = metrics.parent
    crash = (run_dir / "logs" / "rank2.log").read_text()
    assert "Fatal Python error: Segmentation fault" in crash and "hpcmega/training/" in crash, crash[-3000:]
    assert f"run folder: runs/{run_dir.name}" in output
    assert not [pid for pid in ranks.values() if Path(f"/proc/{pid}").exists()], "rank processes left behind"

"""`hpcmega submit` against the real local SLURM cluster (slurm/start-cluster.sh): sbatch -> srun -> submitit ->
hpcmega.training.job.run_rank on 2 nodes x 2 CPU tasks, plus --dry-run, site profiles, refusals and a failing job."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, all_pids, popen_cli, process_env, run_cli

from hpcmega.config import load_config
from hpcmega.cluster.slurm import sbatch_script

SMALL = ["--cpu", "--global-batch", "4", "--seq-len", "32", "--wandb", "disabled", "--time", "00:10:00"]


def _job_id(output: str) -> str:
    m = re.search(r"submitted job (\d+)", output)
    assert m, output
    return m.group(1)


def _submission_folder(run_dir: Path, job_id: str) -> Path:
    found = list(run_dir.glob(f"slurm/*/{job_id}_submission.sh"))
    assert len(found) == 1, found
    return found[0].parent


@pytest.mark.slurm
def test_submit_runs_two_nodes_with_tp_inside_each_node(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--tp", "2", "--pp", "2", "--steps", "3",
                      *SMALL, "--wait", "--run-dir", run_dir], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    job_id = _job_id(out)
    assert f"run folder: {run_dir}" in out
    for how in (f"squeue -j {job_id}", f"sacct -j {job_id}", f"tail -f {run_dir}/slurm/"):
        assert how in out
    assert f"job {job_id} finished: COMPLETED" in out
    assert "collectives self-test passed" in out  # rank 0's log was followed while waiting

    layout = json.loads((run_dir / "layout.json").read_text())
    coords = layout["rank_coords"]
    nodes = {c["node"] for c in coords}
    assert len(nodes) == 2
    for group in layout["tp_groups"]:
        assert len({coords[r]["node"] for r in group}) == 1, f"TP group {group} crosses nodes: {coords}"
    for group in layout["pp_groups"]:
        assert len({coords[r]["node"] for r in group}) == 2  # the pipeline spans the nodes
    nnodes = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "NNodes"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert nnodes == ["2"]

    cfg = load_config(run_dir / "config.toml")
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node, cfg.cluster.cpu, cfg.parallel.tp) == (2, 2, True, 2)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    # the script sbatch received is exactly what --dry-run renders for the same config and folder
    folder = _submission_folder(run_dir, job_id)
    assert (folder / f"{job_id}_submission.sh").read_text() == sbatch_script(cfg, folder)


@pytest.mark.slurm
def test_cyclic_distribution_keeps_tp_groups_on_one_node(slurm_cluster, tmp_path):
    """SLURM's cyclic distribution puts ranks 0, 2 on one node and 1, 3 on the other: the groups follow the real
    placement (not rank arithmetic), so TP still stays inside a node, and the job says the layout differs."""
    run_dir = tmp_path / "run"
    result = run_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--tp", "2", "--steps", "1", *SMALL,
                      "--sbatch=--distribution=cyclic", "--wait", "--run-dir", run_dir], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    layout = json.loads((run_dir / "layout.json").read_text())
    coords = layout["rank_coords"]
    assert coords[0]["node"] == coords[2]["node"] != coords[1]["node"] == coords[3]["node"]
    assert layout["tp_groups"] == [[0, 2], [1, 3]]
    assert layout["dp_groups"] == [[0, 1], [2, 3]]
    assert "notice: the real placement gives different groups than the planned block layout" in out


def test_dry_run_prints_the_sbatch_script_and_writes_nothing(tmp_path):
    result = run_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--tp", "2", "--pp", "2", *SMALL,
                      "--partition", "debug", "--sbatch=--reservation=r1", "--dry-run"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    lines = set(out.splitlines())
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --signal=USR2@120",
                     "#SBATCH --partition=debug", "#SBATCH --time=10", "#SBATCH --reservation=r1"):
        assert expected in lines, expected
    assert not any(line.startswith("#SBATCH --gpus") for line in lines)  # --cpu: no GPUs requested
    assert re.search(r"^srun .*--kill-on-bad-exit=1 .* -m submitit.core._submit ", out, re.M)
    assert "TP groups" in out and "nothing submitted" in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no submitit folder


def test_site_profile_sets_the_scheduler_options(tmp_path):
    result = run_cli(["submit", "--config", REPO / "slurm/sites/example.toml", "--nodes", "4", "--tp", "8", "--pp",
                      "2", "--model", "gpt-7b", "--time", "02:00:00", "--dry-run"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = set(result.stdout.splitlines())
    for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --qos=normal",
                     "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --cpus-per-task=12",
                     "#SBATCH --mem=0", "#SBATCH --signal=USR2@300", "#SBATCH --reservation=my-reservation",
                     "#SBATCH --time=120"):  # the command line's --time wins over the profile's 24:00:00
        assert expected in lines, expected
    assert list(tmp_path.iterdir()) == []


def test_refusals_exit_2_before_anything_is_written(tmp_path):
    cases = [
        (["--sbatch=--ntasks-per-node=3"], "--gpus-per-node"),  # would break one task per GPU
        (["--sbatch=-w node1"], "long form"),
        (["--time", "soon"], "cluster.time"),
        (["--tp", "3"], "tp=3"),
    ]
    for extra, fragment in cases:
        result = run_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--cpu", *extra,
                          "--run-dir", tmp_path / "run"], cwd=tmp_path)
        assert result.returncode == 2, (extra, result.stdout, result.stderr)
        assert fragment in result.stderr and "Traceback" not in result.stderr, (extra, result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
def test_a_failing_job_makes_wait_exit_nonzero(slurm_cluster, tmp_path):
    """A rank dies mid-training (SIGKILL, as the OOM killer does) before the first checkpoint: srun ends the step,
    nothing can be resumed so the job is not restarted (hpcmega.cluster.restarts), the job FAILS, and `submit
    --wait` reports it, shows the end of rank 0's log (naming the dead task and why it was not restarted) and
    exits non-zero."""
    run_dir, log = tmp_path / "run", tmp_path / "submit.out"
    proc = popen_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--tp", "2", "--pp", "2", "--steps",
                      "100000", *SMALL, "--wait", "--run-dir", run_dir], output=log, cwd=tmp_path)
    try:
        deadline, victim = time.monotonic() + 180, None
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                for pid in all_pids():
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        continue
                    if "submitit.core._submit" in cmdline and str(run_dir) in cmdline \
                            and process_env(pid).get("SLURM_PROCID") == "1":
                        victim = pid
            time.sleep(0.2)
        assert victim is not None, "rank 1 never started training:\n" + log.read_text()
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 1, out
    job_id = _job_id(out)
    assert f"job {job_id} finished: FAILED" in out
    assert "last lines of rank 0's log" in out and "task 1: Killed" in out
    assert "no intact checkpoint to resume from yet: not restarted" in out, out


@pytest.mark.slurm
def test_a_placement_that_splits_a_tp_group_fails_cleanly_on_every_rank(slurm_cluster, tmp_path):
    """Only the job can see where SLURM really put its tasks: `--distribution=plane=3` puts 3 ranks on one node
    and 1 on the other, so tp=2 cannot stay inside a node. The ranks refuse from the same gathered placement, so
    they all fail with the same reason (none waits for the others), the job fails, and `--wait` exits non-zero
    showing that reason."""
    run_dir = tmp_path / "run"
    result = run_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--tp", "2", "--steps", "1", *SMALL,
                      "--sbatch=--distribution=plane=3", "--wait", "--run-dir", run_dir], cwd=tmp_path, timeout=180)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    job_id = _job_id(out)
    assert f"job {job_id} finished: FAILED" in out
    reason = "holds 3 ranks, not a multiple of tp=2"
    assert reason in out
    folder = _submission_folder(run_dir, job_id)
    refused = 0
    for task in range(4):
        err = (folder / f"{job_id}_{task}_log.err").read_text()
        if "Traceback" in err:  # a task srun ended first (--kill-on-bad-exit) has no traceback
            assert reason in err, f"task {task} failed for another reason:\n{err}"
            refused += 1
    assert refused >= 1
    assert not (run_dir / "layout.json").exists()

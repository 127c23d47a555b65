"""`submit --sweep`: the cartesian product of points as one SLURM job array (submitit's batch), one run folder per
point, one W&B group; `--after` chains with afterok."""
from __future__ import annotations

import re
import subprocess

import pytest
from conftest import assert_refused, run_cli
from wandb_reader import read_run

from hpcmega.errors import ConfigError
from hpcmega.runs.sweep import parse_sweeps, point_name, points

BASE = ["submit", "--cpu", "--nodes", "1", "--gpus-per-node", "2", "--global-batch", "4", "--seq-len", "32",
        "--time", "00:10:00"]


def test_points_are_the_cartesian_product_in_order():
    sweeps = parse_sweeps(["train.lr=3e-4,6e-4", "parallel.tp=4,8"])
    got = [point_name(i, p) for i, p in enumerate(points(sweeps))]
    assert got == ["00-lr=3e-4-tp=4", "01-lr=3e-4-tp=8", "02-lr=6e-4-tp=4", "03-lr=6e-4-tp=8"]
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        parse_sweeps(["train.lrr=1,2"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_sweeps(["train.lr=1", "train.lr=2"])


def test_sweep_dry_run_is_one_array_script_and_writes_nothing(tmp_path):
    r = run_cli([*BASE, "--sweep", "train.lr=3e-4,6e-4", "--sweep", "parallel.tp=1,2", "--after", "41",
                 "--run-dir", tmp_path / "sw", "--dry-run"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep: 4 point(s)" in r.stdout and "W&B group sw" in r.stdout
    assert re.search(r"01-lr=3e-4-tp=2 +tp=2 pp=1 dp=1 +train.lr=3e-4 parallel.tp=2", r.stdout)
    lines = r.stdout.splitlines()
    for want in ("#SBATCH --array=0-3%4", "#SBATCH --dependency=afterok:41", "#SBATCH --job-name=sw"):
        assert want in lines, want
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["--sweep", "cluster.nodes=1,2"], ["sweep point 01-nodes=2 changes the job's shape (nodes)"]),
    (["--sweep", "parallel.tp=1,3"], ["sweep point 01-tp=3: tp=3"]),
    (["--sweep", "train.lr"], ["section.key=v1,v2"]),
    (["--after", "soon"], ["--after 'soon'"]),
    (["--sbatch=--array=0-3"], ["use --sweep"]),
    (["--sbatch=--dependency=afterok:1"], ["use --after JOBID"]),
])
def test_bad_sweeps_exit_2_before_anything_is_written(tmp_path, args, words):
    assert_refused(run_cli([*BASE, *args, "--run-dir", tmp_path / "sw"]), words, tmp_path)


@pytest.mark.slurm
def test_two_point_sweep_is_one_array_job_with_two_run_folders_in_one_wandb_group(slurm_cluster, tmp_path):
    sweep = tmp_path / "lrsweep"
    r = run_cli([*BASE, "--steps", "2", "--wandb", "offline", "--sweep", "train.lr=1e-3,2e-3", "--run-dir", sweep,
                 "--wait"], cwd=tmp_path, env={"WANDB_MODE": "offline"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    array_id = re.search(r"submitted job array (\d+): 2 task", out).group(1)
    assert f"job {array_id}_0 finished: COMPLETED" in out and f"job {array_id}_1 finished: COMPLETED" in out
    rows = subprocess.run(["sacct", "-j", array_id, "-X", "-n", "-P", "-o", "JobID,JobName,State"],
                          capture_output=True, text=True).stdout.split()
    assert sorted(rows) == [f"{array_id}_0|lrsweep|COMPLETED", f"{array_id}_1|lrsweep|COMPLETED"]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "slurm")
    assert folders == ["00-lr=1e-3", "01-lr=2e-3"]
    runs = []
    for name, lr in zip(folders, (1e-3, 2e-3)):
        files = list((sweep / name).glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        runs.append(read_run(files[0]))
        assert runs[-1]["config"]["train"]["lr"] == lr
    assert runs[0]["group"] == runs[1]["group"] == "lrsweep"
    assert runs[0]["run_id"] != runs[1]["run_id"]
    ls = run_cli(["ls", sweep])
    assert re.search(rf"^00-lr=1e-3 +{array_id}_0 +COMPLETED +2/2", ls.stdout, re.M), ls.stdout

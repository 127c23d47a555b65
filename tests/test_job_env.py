"""The job's environment: [cluster] setup lines, [cluster.env], a container, the job name and the requeue flag --
all visible in `submit --dry-run`, and the first two checked in a real job on the dev cluster."""
from __future__ import annotations

import re
import subprocess

import pytest
from conftest import assert_refused, run_cli

BASE = ["submit", "--cpu", "--nodes", "1", "--gpus-per-node", "1", "--global-batch", "4", "--seq-len", "32",
        "--wandb", "disabled", "--time", "00:10:00"]


def _script(result) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout[result.stdout.index("#!/bin/bash"):].splitlines()


def test_dry_run_shows_setup_env_container_job_name_and_requeue(tmp_path):
    conf = tmp_path / "site.toml"
    conf.write_text('[cluster]\nsetup = ["module load cuda/12.4"]\n[cluster.env]\nNCCL_DEBUG = "WARN"\n')
    lines = _script(run_cli([*BASE, "--config", conf, "--setup", "source $VENV/bin/activate", "--env",
                             "NCCL_DEBUG=INFO", "--env", "VENV=/opt/my env", "--container", "nvcr.io/nvidia/pytorch:24.05",
                             "--container-mount", "/data:/data", "--run-dir", tmp_path / "my-run", "--dry-run"],
                            cwd=tmp_path))
    setup = lines[lines.index("# setup") + 1:lines.index("# command")]
    # env first (the flag wins over the file, key by key), then the file's and the flag's setup lines in order
    assert setup[:4] == ["export NCCL_DEBUG=INFO", "export VENV='/opt/my env'", "module load cuda/12.4",
                         "source $VENV/bin/activate"]
    assert "#SBATCH --job-name=my-run" in lines and "#SBATCH --requeue" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert f"--container-image=nvcr.io/nvidia/pytorch:24.05 --container-mounts={tmp_path}/my-run:{tmp_path}/my-run," \
           "/data:/data" in srun and srun.endswith(f"python3 -u -m submitit.core._submit {tmp_path}/my-run/slurm/"
                                                   + srun.rsplit("/", 1)[1])
    assert not (tmp_path / "my-run").exists()


def test_no_requeue_apptainer_and_explicit_job_name(tmp_path):
    lines = _script(run_cli([*BASE, "--no-requeue", "--container", "/img/torch.sif", "--container-runtime",
                             "apptainer", "--job-name", "exp1", "--run-dir", tmp_path / "r", "--dry-run"]))
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --job-name=exp1" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert f"apptainer exec --bind {tmp_path}/r:{tmp_path}/r /img/torch.sif python3 -u -m submitit" in srun


@pytest.mark.parametrize("args, words", [
    (["--env", "NCCL DEBUG=1"], ["cluster.env key 'NCCL DEBUG'"]),
    (["--env", "NOVALUE"], ["cluster.env (--env)", "cannot read"]),
    (["--setup", "echo a\nrm -rf x"], ["cluster.setup", "not allowed"]),
    (["--sbatch=--requeue"], ["--requeue/--no-requeue"]),
])
def test_bad_job_environment_exits_2(tmp_path, args, words):
    assert_refused(run_cli([*BASE, *args, "--run-dir", tmp_path / "r", "--dry-run"]), words, tmp_path)


@pytest.mark.slurm
def test_setup_lines_and_env_reach_the_job(slurm_cluster, tmp_path):
    run_dir = tmp_path / "envrun"
    result = run_cli([*BASE, "--steps", "1", "--env", "HPCMEGA_PROBE=hello world", "--setup",
                      'echo "probe=$HPCMEGA_PROBE on $(hostname)"', "--run-dir", run_dir, "--wait"], cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    log = next(run_dir.glob(f"slurm/*/{job_id}_0_log.out")).read_text()
    assert re.search(r"^probe=hello world on \S+$", log, re.M), log
    name = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobName"], capture_output=True,
                          text=True).stdout.split()
    assert name == ["envrun"]

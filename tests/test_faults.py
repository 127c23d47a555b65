"""Faults and hostile input, one test (or corpus) per finding of issue 10's fault-injection pass.

Each test fails on the code before the hardening and passes after. Multi-process tests stay tiny (2 CPU ranks,
d 64, few steps); the SLURM preemption test lives in test_preemption.py.
"""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcmega.cli import main
from hpcmega.config import ConfigError, load_config
from hpcmega.slurm import sbatch_script

SUBMIT = ["submit", "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--global-batch", "4", "--seq-len", "32",
          "--wandb", "disabled", "--time", "00:10:00", "--dry-run"]

# -- 1. nothing a user types reaches the job script as a command ------------------------------------------------------
# (flags, expected fragment of the exit-2 message, or None when the value is legal and must render harmlessly).
# {M} is replaced by a marker file an injected command would create.
HOSTILE: list[tuple[list[str], str | None]] = [
    (["--partition", "gpu\ntouch {M} #"], "contains '\\n'"),
    (["--qos", "normal\ntouch {M}"], "contains '\\n'"),
    (["--constraint", "h100\rtouch {M}"], "contains '\\r'"),
    (["--account", "acct\n\ntouch {M}"], "contains '\\n'"),
    (["--mem", "64G\n"], "contains '\\n'"),
    (["--job-name", "x\ntouch {M}"], "contains '\\n'"),
    (["--job-name", "a\tb"], "contains '\\t'"),
    (["--time", "00:10:00\ntouch {M}"], "contains '\\n'"),
    (["--sbatch", "--comment=a\ntouch {M}"], "contains '\\n'"),
    (["--sbatch", "--comment\ntouch {M}"], "contains '\\n'"),
    (["--sbatch", "--reservation=r\x00x"], "contains '\\x00'"),
    (["--sbatch", "--export=ALL\x1b[2J"], "contains '\\x1b'"),
    (["--sbatch", "--ntasks 4"], "sets --ntasks itself"),
    (["--sbatch", "--ntasks=4"], "sets --ntasks itself"),
    (["--sbatch", "--ntasks-per-gpu=1"], "sets --ntasks-per-gpu itself"),
    (["--sbatch", "--gres=gpu:8"], "sets --gres itself"),
    (["--sbatch", "--nodes 3"], "sets --nodes itself"),
    (["--sbatch", "--gpus-per-task=1"], "sets --gpus-per-task itself"),
    (["--sbatch", "--output=/tmp/elsewhere"], "sets --output itself"),
    (["--sbatch", "--wrap=touch {M}"], "sets --wrap itself"),
    (["--sbatch", "--signal=USR1@60"], "sets --signal itself"),
    (["--sbatch", "--no-requeue"], "sets --no-requeue itself"),
    (["--sbatch", "-N 2"], "long form"),
    (["--sbatch", "-N2"], "long form"),
    (["--sbatch", "--ntasks-per-n=3"], "unknown sbatch option --ntasks-per-n"),
    (["--sbatch", "--$(touch {M})=1"], "unknown sbatch option"),
    (["--sbatch", "reservation=x"], "write it as --reservation=x"),
    (["--run-dir", "run\ntouch {M} #"], "contains '\\n'"),
    (["--run-dir", "run-%j"], "contains '%'"),
    (["--run-name", "x\ntouch {M}"], "contains '\\n'"),
    # legal values full of shell syntax: quoted, so they stay data
    (["--partition", "gpu;touch {M}"], None),
    (["--qos", "$(touch {M})"], None),
    (["--constraint", "h100&ib|`touch {M}`"], None),
    (["--account", "a' ; touch {M} ; echo '"], None),
    (["--sbatch", "--comment=$(touch {M})"], None),
    (["--sbatch", "--reservation r1 ; touch {M}"], None),
    (["--sbatch", '--comment="; touch {M}; "'], None),
    (["--sbatch", "--mail-user=a@b;touch {M}"], None),
    (["--run-dir", "run $(touch {M})"], None),
    (["--run-dir", "run'; touch {M}; '"], None),
    (["--job-name", "`touch${{IFS}}{M}`"], None),
]

TOML_HOSTILE = [
    ('[cluster]\npartition = "gpu\\ntouch {M} #"\n', "contains '\\n'"),
    ('[cluster]\nsbatch_extra = ["--gres=gpu:1"]\n', "sets --gres itself"),
    ('[cluster]\nsbatch_extra = ["--comment=x\\ntouch {M}"]\n', "contains '\\n'"),
    ('[logging]\nrun_name = "r\\ntouch {M}"\n', "contains '\\n'"),
]


def test_hostile_corpus_is_large_enough():
    assert len(HOSTILE) + len(TOML_HOSTILE) >= 30


def _stub_bin(tmp_path: Path) -> Path:
    """srun and scontrol that only record their arguments (one per line) and succeed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _check_script_is_inert(script: str, tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, script
    for line in script.splitlines():  # sbatch sees exactly one known option per #SBATCH line
        if line.startswith("#SBATCH"):
            words = shlex.split(line[len("#SBATCH"):])
            assert len(words) == 1 and words[0].startswith("--"), line
    env = {**os.environ, "PATH": f"{_stub_bin(tmp_path)}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not marker.exists(), f"an injected command ran:\n{script}"
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[-3:-1] == ["-m", "submitit.core._submit"] or "submitit.core._submit" in srun_args, srun_args


@pytest.mark.parametrize("flags,refusal", HOSTILE, ids=[repr(f[-1])[:40] for f, _ in HOSTILE])
def test_hostile_values_never_run_in_the_job_script(tmp_path, flags, refusal):
    marker = tmp_path / "INJECTED"
    work = tmp_path / "cwd"
    work.mkdir()
    args = [a.replace("{M}", str(marker)) for a in flags]
    if "--run-dir" in args:
        i = args.index("--run-dir") + 1
        args[i] = str(work / args[i])
    old = os.getcwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(main, SUBMIT + args)
    finally:
        os.chdir(old)
    if refusal is not None:
        assert result.exit_code == 2, (args, result.output)
        assert refusal in result.stderr and "Traceback" not in result.output, result.stderr
        assert list(work.iterdir()) == [] and not marker.exists()
        return
    assert result.exit_code == 0, (args, result.output, result.stderr)
    script = result.stdout.split("nothing submitted):\n\n", 1)[1]
    _check_script_is_inert(script, tmp_path, marker)
    assert not marker.exists() and list(work.iterdir()) == []


@pytest.mark.parametrize("toml,refusal", TOML_HOSTILE)
def test_hostile_site_profile_is_refused(tmp_path, toml, refusal):
    marker = tmp_path / "INJECTED"
    profile = tmp_path / "site.toml"
    profile.write_text(toml.replace("{M}", str(marker)))
    result = CliRunner().invoke(main, SUBMIT + ["--config", str(profile), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and refusal in result.stderr, result.output
    assert not (tmp_path / "run").exists() and not marker.exists()


def test_script_renderer_refuses_unchecked_values_itself(tmp_path):
    """Defence in depth: code that skips validate() still cannot render an injected script."""
    cfg = load_config(None, {"cluster.partition": "gpu\ntouch /tmp/x #"})
    with pytest.raises(ConfigError, match="contains"):
        sbatch_script(cfg, tmp_path / "s")
    with pytest.raises(ConfigError, match="contains"):
        sbatch_script(load_config(), tmp_path / "a\nb")

"""Shared test fixtures: the local SLURM dev cluster and a way to run the real `hpcmega` command line.

Fixtures for one area (W&B, ...) live in their own files; this one holds the cluster, the S3 server (checkpoints
and data) and generic helpers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_CLUSTER = REPO / "slurm" / "start-cluster.sh"

# The demo corpus (`train.data = auto`) is prepared once per test session, here, not in the user's ~/.cache.
os.environ.setdefault("HPCMEGA_CACHE", tempfile.mkdtemp(prefix="hpcmega-test-cache-"))
# Every rank process of every test: one thread (other suites run at the same time on a 2-core machine).
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def hpcmega_exe() -> str:
    """The `hpcmega` console script of the interpreter running the tests (the venv's)."""
    exe = Path(sys.executable).parent / "hpcmega"
    found = str(exe) if exe.exists() else shutil.which("hpcmega")
    assert found, "the hpcmega console script is not installed; run `pip install -e .`"
    return found


def run_cli(args: list[str], cwd: str | Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `hpcmega ARGS` as a user would (a real process); returns the CompletedProcess with text output."""
    return subprocess.run([hpcmega_exe(), *map(str, args)], cwd=cwd, env={**CLI_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, words: list[str], folder: Path) -> None:
    """Bad input: exit 2 with every one of ``words`` in the error, and nothing written into ``folder``."""
    assert result.returncode == 2, result.stdout + result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    assert list(Path(folder).iterdir()) == []


def popen_cli(args: list[str], output: Path, cwd: str | Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `hpcmega ARGS` in the background, stdout and stderr into the file ``output`` (a pipe nobody reads
    would fill up and block a long run)."""
    with open(output, "w") as out:
        return subprocess.Popen([hpcmega_exe(), *map(str, args)], cwd=cwd, env={**CLI_ENV, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT)


def process_env(pid: int) -> dict[str, str]:
    """Another process's environment (Linux /proc); empty if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def rank_pids(run_dir: str | Path) -> list[int]:
    """The rank processes (``python -m hpcmega.training.job``) of the local run in ``run_dir``."""
    out = []
    for pid in all_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "hpcmega.training.job" in cmd and str(run_dir) in cmd:
            out.append(pid)
    return out


def _sinfo_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,alloc,mix", "-o", "%N"], capture_output=True,
                             text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and len(set(out.stdout.split())) >= 2


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A live SLURM cluster with at least 2 responding nodes; starts slurm/start-cluster.sh if needed.

    Never skips: a test that needs SLURM fails loudly when the cluster cannot be started.
    """
    if not _sinfo_answers():
        result = subprocess.run(["bash", str(START_CLUSTER)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not _sinfo_answers():
            pytest.fail(
                f"could not start the SLURM dev cluster (bash {START_CLUSTER}, needs root):\n"
                f"{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
    return {"partition": "debug"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto's) on 127.0.0.1 with a bucket; s3fs talks HTTP to it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **creds).create_bucket(Bucket="ckpt")
    yield endpoint
    server.stop()

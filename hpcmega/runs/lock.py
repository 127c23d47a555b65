"""One job per run folder. Two runs in one folder would resume each other's checkpoints under different seeds and
overwrite each other's checkpoints, metrics and config, so a run folder is locked while a job uses it.

The lock file ``RUN_DIR/LOCK_FILE`` holds its holder: a SLURM job id (for `submit` and every attempt of the job)
or host + pid (for `hpcmega run`). A lock is stale -- and taken over -- when its SLURM job has left the queue, or
its local process is gone (same host). A holder on another host without a job id cannot be checked from here; the
message then says how to remove the lock by hand. SLURM locks are never released explicitly: the job leaving the
queue is the release (a requeued job keeps its lock across attempts).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from hpcmega.errors import ConfigError
from hpcmega.runs.files import LOCK as LOCK_FILE


def holder(job_id: str | None = None) -> dict[str, Any]:
    return {"job_id": job_id or None, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _slurm_job_alive(job_id: str) -> bool:
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: assume it still runs
    return out.returncode == 0 and bool(out.stdout.strip())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(h: dict[str, Any]) -> bool:
    if h.get("job_id"):
        return _slurm_job_alive(str(h["job_id"]))
    if h.get("host") != socket.gethostname():
        return True
    return isinstance(h.get("pid"), int) and _process_alive(h["pid"])


def describe(h: dict[str, Any]) -> str:
    if h.get("job_id"):
        return f"SLURM job {h['job_id']} (scancel {h['job_id']} to stop it)"
    return f"hpcmega run pid {h.get('pid')} on host {h.get('host')}"


def read(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_dir) / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}  # unreadable: treat as stale
    return data if isinstance(data, dict) else {}


def check_free(run_dir: str | Path, job_id: str | None = None) -> None:
    """ConfigError naming the holder if another live job/process holds the run folder."""
    h = read(run_dir)
    if not h or (job_id and str(h.get("job_id")) == str(job_id)) or not is_live(h):
        return
    where = Path(run_dir) / LOCK_FILE
    hint = "" if h.get("job_id") or h.get("host") == socket.gethostname() else \
        f"; if it is gone, remove {where}"
    raise ConfigError(f"run folder {run_dir} is in use by {describe(h)}; wait for it to end or use another "
                      f"--run-dir{hint}")


def acquire(run_dir: str | Path, job_id: str | None = None) -> dict[str, Any]:
    """Check, then write this process's (or job's) claim atomically; returns the claim."""
    check_free(run_dir, job_id)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    claim = holder(job_id)
    tmp = Path(run_dir) / f".{LOCK_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(claim))
    os.replace(tmp, Path(run_dir) / LOCK_FILE)
    return claim


def release(run_dir: str | Path, claim: dict[str, Any]) -> None:
    """Remove the lock if it is still ours (a local run at its end)."""
    if read(run_dir) == claim:
        try:
            (Path(run_dir) / LOCK_FILE).unlink()
        except FileNotFoundError:
            pass

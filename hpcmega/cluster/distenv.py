"""Who am I in the job: rank, local rank, world, node and rendezvous address, read from the environment.

A rank starts in one of three ways and must build the same picture in each:

- a SLURM task (``srun``, one task per GPU, no torchrun): ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``,
  the node from ``SLURMD_NODENAME``, the rendezvous host = the first node of the step's node list (where SLURM's
  block and cyclic distributions both put rank 0), the port derived from the job id so that concurrent jobs on a
  shared node do not collide and a requeued job reuses its port;
- ``hpcmega run`` (hpcmega.cluster.launcher) or torchrun: ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
  ``MASTER_PORT`` (+ ``HPCMEGA_NODE`` from our launcher);
- a plain ``python`` process: a world of one.

Pure Python (no torch): the parsing is unit-tested with fake environments.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hpcmega.errors import ConfigError
from hpcmega.runs.files import DEBUG, FR_TRACE_PREFIX

# Set in every rank's environment (SLURM script and local launcher) unless the user's environment already sets them:
# - TORCH_NCCL_ASYNC_ERROR_HANDLING=3: a timed-out or failed NCCL collective tears the process down instead of
#   hanging, so srun --kill-on-bad-exit ends the job step;
# - TORCH_FR_BUFFER_SIZE / TORCH_NCCL_DUMP_ON_TIMEOUT: the flight recorder keeps the last 2000 collectives per rank
#   (NCCL's and gloo's; torch 2.13 warns on every rank for its older name TORCH_NCCL_TRACE_BUFFER_SIZE) and NCCL dumps
#   them on a timeout (which rank stopped in which collective) into RUN_DIR/debug/ (flight_recorder_env, set by the
#   rank itself); hpcmega.training.hang_evidence dumps gloo's;
# - PYTORCH_ALLOC_CONF=expandable_segments:True: less fragmentation of the CUDA caching allocator with varying
#   activation sizes (pipeline microbatches, recompute).
JOB_ENV: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_FR_BUFFER_SIZE": "2000",
    "PYTORCH_ALLOC_CONF": "expandable_segments:True",
}


def flight_recorder_env(run_dir: str | os.PathLike) -> dict[str, str]:
    """Where the flight recorder dumps: RUN_DIR/debug/fr_trace_rank_<rank> (torch appends the rank), not the
    node-local /tmp default that vanishes with the allocation. The current name and NCCL's older one."""
    prefix = str(Path(run_dir) / DEBUG / FR_TRACE_PREFIX)
    return {"TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}


# Ports derived from a job id fall in [BASE, BASE + SPAN): below Linux's ephemeral range (32768+), so a port picked
# for a rendezvous is not already taken by some outgoing connection.
DERIVED_PORT_BASE = 12000
DERIVED_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node: str
    master_addr: str
    master_port: int
    job_id: str | None  # the SLURM job id; None for local runs (nothing to requeue)
    restart_count: int  # how many times SLURM has requeued this job (0 on the first attempt)

    @property
    def under_slurm(self) -> bool:
        return self.job_id is not None

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def derived_port(job_id: str) -> int:
    """A rendezvous port that is the same on every task of a job (and on its requeues) and differs between jobs."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return DERIVED_PORT_BASE + int(digits) % DERIVED_PORT_SPAN


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment variable {key} is not set; start ranks with hpcmega run/submit")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} is not an integer") from None


# -- SLURM host lists ----------------------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(item)
    return out


_RANGES = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def _well_formed(nodelist: str) -> bool:
    if not re.fullmatch(r"[A-Za-z0-9._,\[\]-]+", nodelist):
        return False
    outside = re.sub(r"\[([^\[\]]*)\]", lambda m: "" if _RANGES.fullmatch(m.group(1)) else "!", nodelist)
    return "[" not in outside and "]" not in outside and "!" not in outside


def parse_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM host list ('gpu[001-003,010],login1', 'r[1-2]-n[1-2]') in SLURM's order, without SLURM.
    ConfigError for anything else (a malformed list must not become an IndexError on every rank)."""
    if not _well_formed(nodelist.strip()):
        raise ConfigError(f"SLURM node list {nodelist!r} is not a SLURM host list (e.g. node[1-4],gpu07); "
                          "run inside a SLURM job step, or fix SLURM_JOB_NODELIST")
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        expansions = [""]
        pos = 0
        for m in re.finditer(r"\[([^\]]*)\]", part):
            prefix = part[pos:m.start()]
            expansions = [e + prefix + r for e in expansions for r in _expand_ranges(m.group(1))]
            pos = m.end()
        expansions = [e + part[pos:] for e in expansions]
        hosts.extend(expansions)
    if not hosts or not all(hosts):
        raise ConfigError(f"SLURM node list {nodelist!r} names no hosts (an empty or reversed range); fix "
                          "SLURM_JOB_NODELIST")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` (SLURM's own parser) when it answers, else the
    pure-Python parser (e.g. a compute image without a configured scontrol)."""
    parsed = parse_hostlist(nodelist)  # validates; scontrol accepts some malformed lists
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10)
            names = out.stdout.split()
            if out.returncode == 0 and names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    return parsed


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ConfigError(f"cannot read SLURM tasks-per-node value {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# -- the three ways to start -------------------------------------------------------------------------------------
def _from_slurm(env: Mapping[str, str], master_port: int) -> DistEnv:
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise ConfigError("SLURM_PROCID is set but SLURM_JOB_ID is not; run inside a SLURM job step (srun)")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set; run inside a SLURM job step (srun)")
    hosts = expand_nodelist(nodelist)
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1)))
    local_world = 1
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node_spec:
        counts = parse_tasks_per_node(per_node_spec)
        node_index = _int(env, "SLURM_NODEID", hosts.index(node) if node in hosts else 0)
        if 0 <= node_index < len(counts):
            local_world = counts[node_index]
    return DistEnv(
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID", 0),
        world_size=world,
        local_world_size=local_world,
        node=node,
        master_addr=hosts[0],
        master_port=master_port or derived_port(job_id),
        job_id=str(job_id),
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
    )


def _from_launcher(env: Mapping[str, str], master_port: int) -> DistEnv:
    world = _int(env, "WORLD_SIZE")
    port = master_port or _int(env, "MASTER_PORT", 0)
    if world > 1 and not port:
        raise ConfigError("MASTER_PORT is not set for a multi-rank local run; start ranks with `hpcmega run --nproc`")
    return DistEnv(
        rank=_int(env, "RANK"),
        local_rank=_int(env, "LOCAL_RANK", 0),
        world_size=world,
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
        node=env.get("HPCMEGA_NODE") or socket.gethostname(),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=port,
        job_id=None,
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
    )


def from_environment(env: Mapping[str, str] | None = None, master_port: int = 0) -> DistEnv:
    """Read this process's place in the job. ``master_port`` (cluster.master_port) overrides the derived port.

    Launcher variables win over SLURM's: ``hpcmega run`` inside an allocation is a local run.
    """
    env = os.environ if env is None else env
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        de = _from_launcher(env, master_port)
    elif env.get("SLURM_PROCID") is not None:
        de = _from_slurm(env, master_port)
    else:
        de = DistEnv(0, 0, 1, 1, socket.gethostname(), "127.0.0.1", master_port, None, 0)
    if not (0 <= de.rank < de.world_size) or not (0 <= de.local_rank < max(1, de.local_world_size)):
        raise ConfigError(
            f"inconsistent rank environment: rank {de.rank} of {de.world_size}, local rank {de.local_rank} of "
            f"{de.local_world_size}; start ranks with hpcmega run/submit"
        )
    return de

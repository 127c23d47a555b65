"""Runtime safety of a job (issue 7, item 6): a GPU job never falls back to CPU, every rank gets the NCCL/allocator
environment (the user's values win), checkpoint collectives run on their own group with a longer timeout, and a hung
rank leaves flight-recorder and stack evidence in the run folder (issue 16, item 6)."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_harness import spawn

from hpcmega.config import Config, resolve_defaults
from conftest import run_cli
from hpcmega.cluster.distenv import JOB_ENV, flight_recorder_env
from hpcmega.cluster.launcher import rank_env
from hpcmega.cluster.slurm import sbatch_script


def test_gpu_job_without_cuda_exits_non_zero_naming_the_node(tmp_path):
    cfg = Config()
    cfg.cluster.gpus_per_node = 1  # a GPU job (cluster.cpu false) of one rank
    resolve_defaults(cfg)
    conf = tmp_path / "config.toml"
    conf.write_text(cfg.to_toml())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "hpcmega.training.job", "--config", str(conf), "--run-dir",
                           str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{socket.gethostname()}: rank 0 of a GPU job sees no CUDA device" in proc.stderr
    assert "--cpu" in proc.stderr
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_sbatch_script_sets_the_job_environment_and_user_values_win(tmp_path):
    cfg = Config()
    cfg.cluster.cpu, cfg.cluster.gpus_per_node = True, 2
    resolve_defaults(cfg)
    script = sbatch_script(cfg, tmp_path)
    exports = [line for line in script.splitlines() if line.startswith("export ") and any(k in line for k in JOB_ENV)]
    assert len(exports) == len(JOB_ENV)
    # run those lines in bash, once with the user's own allocator setting exported
    shown = "; ".join(f'echo "{k}=${k}"' for k in JOB_ENV)
    for user in ({}, {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}):
        env = {"PATH": os.environ["PATH"], **user}
        out = subprocess.run(["bash", "-c", "\n".join(exports) + "\n" + shown], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        want = {**JOB_ENV, **user}
        assert out == [f"{k}={want[k]}" for k in JOB_ENV]


def test_local_ranks_get_the_same_environment_unless_the_user_set_it():
    env = rank_env(0, 2, 12345, "n1", base={"TORCH_FR_BUFFER_SIZE": "50"})
    assert env["TORCH_FR_BUFFER_SIZE"] == "50"
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in env  # the old name: torch warns on every rank when it is set
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    dump = flight_recorder_env("/runs/r1")  # set by each rank: dumps land in the run folder, not node-local /tmp
    assert dump == {"TORCH_FR_DUMP_TEMP_FILE": "/runs/r1/debug/fr_trace_rank_",
                    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/runs/r1/debug/fr_trace_rank_"}


def _hung_rank(run_dir: str, port: int) -> dict:
    """Rank 1 hangs (never joins the second all-reduce); rank 0 times out after 2 s and records the failure. The
    job's store is a TCPStore on ``port`` (rank 0 hosts it, as the rendezvous store of a real job)."""
    import torch
    import torch.distributed as dist

    from hpcmega.parallel.timeouts import set_group_timeout
    from hpcmega.training.hang_evidence import HangEvidence

    rank = dist.get_rank()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=30))
    evidence = HangEvidence(run_dir, rank, 2, store, poll_s=0.5)
    set_group_timeout(dist.group.WORLD, 2)
    dist.all_reduce(torch.ones(1))  # both ranks finish this one
    out = {"error": None}
    if rank == 1:  # hung: never joins the next collective (until it has dumped, so the test cannot race the dump)
        deadline = time.monotonic() + 60
        while not (Path(run_dir) / "debug" / "stacks_rank_1.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
    else:
        try:
            dist.all_reduce(torch.ones(1))
        except Exception as e:  # noqa: BLE001 -- gloo raises RuntimeError on timeout
            out["error"] = str(e)
            evidence.on_failure(e)
    evidence.stop()
    return out


def test_a_hung_rank_leaves_evidence_in_the_run_folder(tmp_path, monkeypatch):
    """gloo, 2 ranks, a 2 s timeout: rank 0's collective times out; both ranks' flight-recorder entries and stacks
    land in RUN_DIR/debug/ (the hung rank's through the store), and `hpcmega status` points at them."""
    import pickle

    from engine_harness import free_port

    from hpcmega.runs.files import RunFolder

    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "100")  # JOB_ENV's recorder, inherited by the spawned ranks
    results = spawn(2, _hung_rank, str(tmp_path), free_port())
    assert "Timed out" in results[0]["error"], results[0]
    debug = tmp_path / "debug"
    stacks = [(debug / f"stacks_rank_{r}.txt").read_text() for r in range(2)]
    assert "rank 0 failed" in stacks[0] and "Timed out" in stacks[0]
    assert "asked by the job's store: rank 0 failed" in stacks[1] and "in _hung_rank" in stacks[1]  # where it hangs
    traces = [pickle.loads((debug / f"fr_trace_rank_{r}").read_bytes()) for r in range(2)]  # torch's dump format
    seqs = [[e["collective_seq_id"] for e in t["entries"] if "all_reduce" in e["profiling_name"]] for t in traces]
    assert seqs[0][-1] == seqs[1][-1] + 1, seqs  # the collective rank 1 never reached
    RunFolder(tmp_path).write_config(Config().to_toml())
    status = run_cli(["status", tmp_path])
    assert status.returncode == 0 and "hang evidence: 4 file(s)" in status.stdout, status.stdout + status.stderr
    assert "docs/runtime.md" in status.stdout


def _slow_rank_saves(tmp: str) -> dict:
    """Rank 1 reaches the checkpoint 6 s late: a training-timeout (2 s) barrier gives up, the checkpoint's doesn't."""
    import torch
    import torch.distributed as dist

    from hpcmega.checkpoint.store import CheckpointManager, checkpoint_group

    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    ckpt = CheckpointManager(tmp, keep=1, process_group=checkpoint_group(60))
    ckpt.begin(None)
    out = {}
    if dist.get_rank() == 1:
        time.sleep(6)
    else:
        try:
            dist.barrier(group=short)
            out["short"] = "passed"
        except Exception as e:  # noqa: BLE001 -- gloo raises RuntimeError/DistBackendError on timeout
            out["short"] = type(e).__name__
    if dist.get_rank() == 1:
        time.sleep(1)
    state = {"w": torch.full((4,), float(dist.get_rank()))}
    info = ckpt.save(3, state, {})
    out["complete"] = [c.step for c in ckpt.list() if c.complete]
    out["url"] = info.url
    return out


@pytest.mark.slow
def test_checkpoint_collectives_wait_longer_than_training_ones(tmp_path):
    results = spawn(2, _slow_rank_saves, str(tmp_path / "ckpt"))
    assert results[0]["short"] != "passed"  # the short group timed out waiting for the late rank...
    assert results[0]["complete"] == results[1]["complete"] == [3]  # ...the checkpoint group did not


def _late_rank_in_and_after_the_first_step() -> dict:
    """Rank 1 reaches a collective 4 s late, once during the first step and once after it (steady timeout 2 s)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hpcmega.parallel.timeouts import CollectiveTimeouts

    mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    timeouts = CollectiveTimeouts(mesh, first_step_s=60, steady_s=2)
    dp = mesh.get_group("dp")
    out = {}
    if dist.get_rank() == 1:
        time.sleep(4)  # e.g. compiling more slowly than rank 0
    total = torch.ones(1)
    dist.all_reduce(total, group=dp)
    out["first_step"] = total.item()
    timeouts.first_step_done()
    if dist.get_rank() == 1:
        time.sleep(4)  # a hang after the first step; rank 1 never joins
    else:
        try:
            dist.all_reduce(torch.ones(1), group=dp)
            out["steady"] = "passed"
        except Exception as e:  # noqa: BLE001 -- gloo raises RuntimeError on timeout
            out["steady"] = str(e)
    return out


def test_first_step_may_wait_longer_than_later_collectives():
    """Pins the seam over torch's private _set_pg_timeout: a late rank is waited for during the first step (slow
    compile) and timed out after it, on the mesh's own groups."""
    results = spawn(2, _late_rank_in_and_after_the_first_step)
    assert results[0]["first_step"] == results[1]["first_step"] == 2.0
    assert "Timed out" in results[0]["steady"], results[0]["steady"]

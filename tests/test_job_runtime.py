"""Runtime safety of a job (issue 7, item 6): a GPU job never falls back to CPU, every rank gets the NCCL/allocator
environment (the user's values win), and checkpoint collectives run on their own group with a longer timeout."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time

import pytest
from engine_harness import spawn

from hpcmega.config import Config, resolve_defaults
from hpcmega.cluster.distenv import JOB_ENV
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
    assert len(exports) == 4
    # run those lines in bash, once with the user's own allocator setting exported
    shown = "; ".join(f'echo "{k}=${k}"' for k in JOB_ENV)
    for user in ({}, {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}):
        env = {"PATH": os.environ["PATH"], **user}
        out = subprocess.run(["bash", "-c", "\n".join(exports) + "\n" + shown], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        want = {**JOB_ENV, **user}
        assert out == [f"{k}={want[k]}" for k in JOB_ENV]


def test_local_ranks_get_the_same_environment_unless_the_user_set_it():
    env = rank_env(0, 2, 12345, "n1", base={"TORCH_NCCL_TRACE_BUFFER_SIZE": "50"})
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


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

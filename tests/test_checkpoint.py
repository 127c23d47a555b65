"""Checkpoints: exact round trips through fsspec (local, memory://, s3 on a live S3 server on 127.0.0.1), the
commit marker, keep-last-K, `ckpt ls`, and resume / resharding through the real `hpcmega run`."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import rank_pids, run_cli
from engine_harness import free_port

from hpcmega.checkpoint.store import CheckpointManager, ModelOptimizerState, TrainState, list_checkpoints
from hpcmega.config import load_config

SMALL = ["--global-batch", "4", "--seq-len", "32", "--wandb", "disabled"]
# 2 layers split over pp=2; 4 heads and vocab 128 divide by tp=4.
SHAPE = ["--layers", "2", "--heads", "4", "--vocab-size", "128"]


@pytest.fixture
def single_rank():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def _trainer(tmp_path, name):
    from torch.distributed.device_mesh import init_device_mesh

    from hpcmega.training.train import Trainer

    cfg = load_config(overrides={"train.steps": 3, "train.global_batch": 4, "train.seq_len": 32,
                                 "model.n_layers": 2, "model.n_heads": 4, "model.vocab_size": 128})
    mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("pp", "dp", "tp"))
    return Trainer(cfg, mesh, str(tmp_path / name))


def _snapshot(trainer):
    state = ModelOptimizerState(trainer.model_parts, trainer.optimizers).state_dict()
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


@pytest.mark.parametrize("backend", ["local", "memory", "s3"])
def test_round_trip_is_exact(backend, tmp_path, single_rank, request):
    storage = {}
    if backend == "local":
        url = str(tmp_path / "ckpt")
    elif backend == "memory":
        url = f"memory://ckpt-{tmp_path.name}"
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        url = f"s3://ckpt/{tmp_path.name}"
        storage = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint,
                                                                      "region_name": "us-east-1"}}
    a = _trainer(tmp_path, "a")
    for _ in range(2):
        a.train_step()
    manager = CheckpointManager(url, keep=2, storage_options=storage)
    app = lambda t: {"model": ModelOptimizerState(t.model_parts, t.optimizers), "train": TrainState(t)}  # noqa
    manager.save(a.step, app(a), {"layout": {"pp": 1, "dp": 1, "tp": 1}})
    saved = _snapshot(a)
    assert any(k.startswith("optim.state.") for k in saved)  # optimizer moments are in the checkpoint

    b = _trainer(tmp_path, "b")
    assert b.step == 0
    manager.load(manager.latest().url, app(b))
    assert b.step == 2
    loaded = _snapshot(b)
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]) if torch.is_tensor(v) else v == loaded[k], k
    # and training continues identically
    assert a.train_step()["loss"] == b.train_step()["loss"]

    for _ in range(2):  # keep=2: the oldest complete checkpoint goes
        a.train_step()
        manager.save(a.step, app(a), {})
    assert [c.step for c in manager.list()] == [4, 5]


def _losses(run_dir):
    from hpcmega.runs.files import RunFolder

    return {rec["step"]: rec["loss"] for rec in RunFolder(run_dir).steps()}


def test_reshard_resume_and_incomplete_checkpoint(tmp_path):
    """pp2 x tp2 for 10 steps saving at 5; resuming its step-5 checkpoint with tp=4 and with one process gives
    the uninterrupted run's steps 6-10. A checkpoint without its commit marker (what a save killed before the
    marker leaves) is listed INCOMPLETE and `--resume auto` takes the one before it."""
    base = tmp_path / "pp2tp2"
    r = run_cli(["run", "--nproc", "4", "--tp", "2", "--pp", "2", "--steps", "10", "--save-every", "5", *SHAPE,
                 *SMALL, "--run-dir", base], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = _losses(base)
    step5 = base / "checkpoints" / "step-00000005"
    for name, layout in (("tp4", ["--nproc", "4", "--tp", "4"]), ("single", ["--nproc", "1"])):
        d = tmp_path / name
        r = run_cli(["run", *layout, "--steps", "10", *SHAPE, *SMALL, "--resume", step5, "--trust-checkpoint",
                     "--run-dir", d], timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        got = _losses(d)
        assert sorted(got) == list(range(6, 11)), got
        for s in range(6, 11):
            assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (name, s, got[s], want[s])

    (base / "checkpoints" / "step-00000010" / "meta.json").unlink()
    infos = list_checkpoints(str(base / "checkpoints"))
    assert [(c.step, c.complete) for c in infos] == [(5, True), (10, False)]
    ls = run_cli(["ckpt", "ls", base / "checkpoints"])
    assert ls.returncode == 0 and "INCOMPLETE" in ls.stdout and "pp=2 dp=1 tp=2" in ls.stdout
    (base / "metrics.jsonl").unlink()
    r = run_cli(["run", "--nproc", "4", "--tp", "2", "--pp", "2", "--steps", "10", "--save-every", "5", *SHAPE,
                 *SMALL, "--run-dir", base], timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stdout and "step-00000005" in r.stdout, r.stdout + r.stderr
    again = _losses(base)
    assert sorted(again) == list(range(6, 11))
    assert all(abs(again[s] - want[s]) <= 1e-5 * abs(want[s]) for s in again)
    assert list_checkpoints(str(base / "checkpoints"))[-1].complete  # step 10 rewritten and committed


def test_resume_across_fsdp_and_replicate(tmp_path):
    """dp=2 replicate (DDP, plain tensors) for 6 steps saving every 2; FSDP2 dp=2 resumes its step-2 checkpoint and
    saves its own; replicate resumes FSDP2's step-4 one. Both continue the uninterrupted run's losses (2
    microbatches per rank, so gradient accumulation is on)."""
    common = ["--nproc", "2", "--steps", "6", "--save-every", "2", *SMALL, *SHAPE]
    base = tmp_path / "replicate"
    r = run_cli(["run", *common, "--data-parallel", "replicate", "--run-dir", base], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want = _losses(base)
    for name, mode, source, first in (("fsdp", "fsdp", base / "checkpoints" / "step-00000002", 3),
                                      ("back", "replicate", tmp_path / "fsdp" / "checkpoints" / "step-00000004", 5)):
        r = run_cli(["run", *common, "--data-parallel", mode, "--resume", source, "--trust-checkpoint",
                     "--run-dir", tmp_path / name], timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        got = _losses(tmp_path / name)
        assert sorted(got) == list(range(first, 7)), got
        for s in got:
            assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (name, s, got[s], want[s])


def test_ckpt_ls_on_an_empty_url_names_the_problem(tmp_path):
    r = run_cli(["ckpt", "ls", tmp_path / "none"])
    assert r.returncode == 2 and "no checkpoints" in r.stderr


def _kill_ranks_of(run_dir) -> None:
    import os
    import signal

    for pid in rank_pids(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path):
    """Kill the whole local job (SIGKILL, no chance to clean up) while checkpoint 4 is being written: checkpoint 2
    stays the newest complete one, `--resume auto` continues from it, and the steps it re-runs reproduce the
    losses the killed attempt had logged -- nothing before checkpoint 2 is lost."""
    import os
    import signal
    import subprocess
    import time

    from conftest import CLI_ENV, hpcmega_exe

    run_dir = tmp_path / "run"
    # A 50k vocabulary makes each checkpoint ~80 MB (the embedding, the head and their Adam moments; 2 layers are a
    # small part), so its write takes long enough to be caught half-way.
    args = ["run", "--nproc", "1", "--vocab-size", "50304", "--layers", "2", "--steps", "6", "--save-every", "2",
            *SMALL, "--run-dir", str(run_dir)]
    proc = subprocess.Popen([hpcmega_exe(), *args], env=CLI_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = run_dir / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 300
    try:
        while not (target.exists() and any(target.iterdir()) and not (target / "meta.json").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the save of step 4 was never caught"
            time.sleep(0.002)
        _kill_ranks_of(run_dir)  # the writers first; they run in sessions of their own, as on separate nodes
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = _losses(run_dir)
    assert [(c.step, c.complete) for c in list_checkpoints(str(run_dir / "checkpoints"))] == [(2, True), (4, False)]

    r = run_cli(args[:-2] + ["--run-dir", run_dir], timeout=600)
    assert r.returncode == 0 and "step-00000002" in r.stdout, r.stdout + r.stderr
    resumed = {}
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()[len(killed):]):
        if "event" not in rec:  # the restart marker the new attempt writes first
            resumed[rec["step"]] = rec["loss"]
    assert sorted(resumed) == [3, 4, 5, 6]
    for s in (3, 4):  # logged by the killed attempt before it died in the save of step 4
        assert resumed[s] == killed[s], (s, resumed[s], killed[s])
    assert [c.step for c in list_checkpoints(str(run_dir / "checkpoints")) if c.complete][-1] == 6

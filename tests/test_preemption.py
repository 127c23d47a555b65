"""Preemption and crashes on the real dev SLURM cluster: USR2 mid-run -> all ranks save at the same step -> the job
requeues itself -> the new attempt resumes from that checkpoint and finishes with the losses of an uninterrupted
run; a rank killed with SIGKILL -> the job requeues itself from its last checkpoint, with the same losses; a job
that fails before its first step is not retried."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import warnings
from pathlib import Path

import secrets

import pytest
from conftest import all_pids, popen_cli, process_env, run_cli
from wandb_reader import read_history

from hpcmega.training.preemption import decide_requeue

# Far from the limit even on a loaded CI machine (seconds per step): the time-limit USR2 (signal_grace_s before
# the limit) would otherwise requeue an attempt a second time and the tests count attempts.
TIME_LIMIT = "00:30:00"
# A 2-layer, 2-head model is enough for pp=2 x tp=2 (one block per stage, one head per rank). STEPS leaves dozens of
# steps after the signal (sent once 3 steps are logged), so the save is mid-run even where steps are fast; both
# preemption tests train the same run, so one uninterrupted reference serves both.
STEPS = 60
SHAPE = ["--layers", "2", "--heads", "2", "--vocab-size", "128", "--global-batch", "4", "--seq-len", "32"]
MODEL = ["--tp", "2", "--pp", "2", *SHAPE, "--steps", str(STEPS)]


def _losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses (RunFolder.steps: event lines skipped; a step logged twice keeps its last value)."""
    from hpcmega.runs.files import RunFolder

    return {rec["step"]: rec["loss"] for rec in RunFolder(run_dir).steps()}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    """The losses of MODEL trained without interruption, same layout, on this machine (`hpcmega run`)."""
    ref_dir = tmp_path_factory.mktemp("preemption") / "reference"
    ref = run_cli(["run", "--nproc", "4", *MODEL, "--wandb", "disabled", "--run-dir", ref_dir], timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    return _losses(ref_dir)


def _assert_losses_of_an_uninterrupted_run(run_dir: Path, want: dict[int, float]) -> dict[int, float]:
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    return got


def _wait_for_steps(proc, log: Path, run_dir: Path, steps: int, timeout: float) -> str:
    """Wait until the submitted job has logged ``steps`` steps (metrics.jsonl); returns its SLURM job id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"submitted job (\d+)", log.read_text())
        metrics = run_dir / "metrics.jsonl"
        if m and metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return m.group(1)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {steps} steps logged in {timeout} s:\n{log.read_text()}")


def _rank_pid(job_id: str, rank: int) -> int:
    """The process of global rank ``rank`` of SLURM job ``job_id`` (the dev cluster's nodes are this machine)."""
    for pid in all_pids():
        env = process_env(pid)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and \
                cmd.startswith(b"/") and b"python" in cmd.split(b"\0")[0]:
            return pid
    raise AssertionError(f"no process of rank {rank} of job {job_id}")


def test_requeue_policy():
    assert not decide_requeue(None, 0, 3).requeue  # local run: save and stop
    assert decide_requeue("12", 0, 3).requeue
    assert decide_requeue("12", 2, 3).requeue
    assert not decide_requeue("12", 3, 3).requeue  # budget spent


def test_restart_policy_after_a_failed_job_step(tmp_path):
    """Requeue only an attempt that trained and has an intact checkpoint to resume from, within max_restarts;
    an attempt whose ranks had all finished and saved is a success; one that stopped on a signal is SLURM's."""
    from hpcmega.cluster.restarts import decide
    from hpcmega.config import Config
    from hpcmega.runs.files import RunFolder

    run = RunFolder(tmp_path / "run")
    run.write_config(Config().to_toml())
    assert decide(run, "7", 0, 3, True).action == "fail"  # nothing trained: before the first step
    run.record_event("trained", {"job_id": "7", "restart_count": 0, "step": 1})
    no_ckpt = decide(run, "7", 0, 3, True)
    assert no_ckpt.action == "fail" and "no intact checkpoint" in no_ckpt.reason
    step = run / "checkpoints" / "step-00000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 5, "seq": 1, "manifest": {}}')
    assert decide(run, "7", 0, 3, True).action == "requeue"
    assert decide(run, "7", 0, 3, False).action == "fail"  # --no-requeue
    assert decide(run, "8", 0, 3, True).action == "fail"  # another job's attempt never trained
    for restart in range(3):
        run.record_event("failure", {"job_id": "7", "restart_count": restart, "restarted": True})
        run.record_event("trained", {"job_id": "7", "restart_count": restart + 1, "step": 6})
    spent = decide(run, "7", 3, 3, True)
    assert run.crash_restarts("7") == 3 and spent.action == "fail" and "max_restarts=3" in spent.reason
    run.record_event("stop", {"job_id": "7", "restart_count": 3, "signal": "SIGTERM"})
    assert decide(run, "7", 3, 3, True).action == "stop"
    run.record_event("finished", {"job_id": "7", "restart_count": 3})
    assert decide(run, "7", 3, 3, True).action == "finished"  # a rank died at exit, after the run was complete
    assert len(run.attempts()) == 0  # events are not attempts


@pytest.mark.slurm
def test_usr2_saves_requeues_and_resumes_with_identical_losses(slurm_cluster, tmp_path, reference_losses):
    run_dir, log = tmp_path / "run", tmp_path / "submit.out"
    api_key = "sk-" + secrets.token_hex(20)  # must never reach the run folder, sbatch script or pickled job
    proc = popen_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--cpu", "--time", TIME_LIMIT, *MODEL,
                      "--wandb", "offline", "--wait", "--run-dir", run_dir], log, cwd=tmp_path,
                     env={"WANDB_API_KEY": api_key, "WANDB_SILENT": "true"})
    try:
        job_id = _wait_for_steps(proc, log, run_dir, 3, timeout=180)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        signalled_at = len((run_dir / "metrics.jsonl").read_text().splitlines())
        assert proc.wait(timeout=900) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert f"job {job_id} finished: COMPLETED" in out, out

    attempts = [a for a in map(json.loads, (run_dir / "attempts.jsonl").read_text().splitlines()) if "event" not in a]
    assert [a["restart_count"] for a in attempts] == [0, 1], attempts  # SLURM_RESTART_COUNT=1 on the second
    ckpts = run_dir / "checkpoints"
    stop_steps = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if (p / "meta.json").exists())
    assert stop_steps[-1] == STEPS and signalled_at <= stop_steps[0] < STEPS, (stop_steps, signalled_at)
    got = _assert_losses_of_an_uninterrupted_run(run_dir, reference_losses)

    # Both attempts logged to the same W&B run, and what they logged is metrics.jsonl.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    attempts_wandb = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(attempts_wandb) == 2, attempts_wandb
    logged: dict[int, float] = {}
    for folder in attempts_wandb:
        (wandb_file,) = folder.glob("run-*.wandb")
        file_id, rows = read_history(wandb_file)
        assert file_id == run_id
        logged.update({row["_step"]: row["loss"] for row in rows})
    assert logged == got

    scripts = list(run_dir.glob("slurm/*/*_submission.sh")) + list(run_dir.glob("slurm/*/*.pkl"))
    assert scripts, "the sbatch script and pickled job are inside the run folder"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert api_key.encode() not in path.read_bytes(), f"{path} contains WANDB_API_KEY"


def test_sigterm_policy_waits_for_slurm():
    import signal

    d = decide_requeue("12", 0, 3, signal.SIGTERM)
    assert not d.requeue and d.slurm_ends  # SLURM requeues a preempted job itself; a cancelled one stays stopped


@pytest.mark.slurm
def test_preempted_then_a_rank_killed_the_job_saves_requeues_restarts_and_ends_with_identical_losses(
        slurm_cluster, tmp_path, reference_losses):
    """Real preemption (slurm/start-cluster.sh: preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=30): an
    "urgent" job needs our nodes, SLURM sends our tasks SIGTERM, they agree, save, and wait; SLURM requeues the
    job, which resumes after the urgent job. Then one of its ranks is killed with SIGKILL (as the heap-corruption
    abort did): srun ends the step, the job script's teardown records the failure and requeues the job, which
    resumes from its newest intact checkpoint. The job ends with the losses of an uninterrupted run, and `status`
    shows what ended the second attempt. (Before: SIGTERM was not handled and the attempt's progress since the last
    checkpoint was lost; a killed rank ended the job FAILED and nothing restarted it.)"""
    from hpcmega.runs.files import RunFolder

    run_dir, log = tmp_path / "run", tmp_path / "submit.out"
    run = RunFolder(run_dir)
    proc = popen_cli(["submit", "--nodes", "2", "--gpus-per-node", "2", "--cpu", "--time", TIME_LIMIT, *MODEL,
                      "--partition", "preemptible", "--wandb", "disabled", "--wait", "--run-dir", run_dir], log,
                     cwd=tmp_path)
    urgent = None
    try:
        job_id = _wait_for_steps(proc, log, run_dir, 3, timeout=240)
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-N", "2", "--exclusive", "-o", "/dev/null",
                                 "--wrap", "sleep 2"], capture_output=True, text=True, check=True).stdout.strip()
        signalled_at = len((run_dir / "metrics.jsonl").read_text().splitlines())
        deadline = time.monotonic() + 600
        while not any(r.get("restart_count") == 1 for r in run.events("trained")):  # the second attempt trains
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(_rank_pid(job_id, 3), signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        if urgent:
            subprocess.run(["scancel", urgent], capture_output=True)
    out = log.read_text()
    assert f"job {job_id} finished: COMPLETED" in out, out
    counts = [a["restart_count"] for a in run.attempts()]
    assert counts == list(range(len(counts))) and len(counts) >= 3, counts
    logs = "".join(p.read_text() for p in run_dir.glob("slurm/*/*_0_log.out"))
    assert "SIGTERM from SLURM: saved" in logs, logs[-3000:]
    failure, *native = run.events("failure")
    assert failure["restarted"] and failure["restart_count"] == 1 and failure["exit_status"] != 0, failure
    assert failure["lines"][0].startswith("srun: error") and "task 3: Killed" in " ".join(failure["lines"]), failure
    # A resumed attempt of this 4-rank gloo job can die of the native heap corruption issue 19 reports ("malloc():
    # unaligned tcache chunk detected", seen once in CI on 2026-12-03, rank 3, the attempt after the kill). That is
    # the open native defect, not this test's subject; what this test asserts of it is the product's promise: the
    # crashed attempt is recorded, restarted, and the losses still equal an uninterrupted run. It is made loud.
    assert len(counts) == 3 + len(native) and all(f["restarted"] for f in native), native
    for extra in native:
        warnings.warn(f"native crash of a resumed attempt, restarted: {extra['lines'][:2]}")
    ckpts = run_dir / "checkpoints"
    saved = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if (p / "meta.json").exists())
    assert saved[-1] == STEPS and signalled_at <= saved[0] < STEPS, (saved, signalled_at)
    _assert_losses_of_an_uninterrupted_run(run_dir, reference_losses)
    status = run_cli(["status", run_dir])
    assert f"{1 + len(native)} after a crash" in status.stdout and "task 3: Killed" in status.stdout, status.stdout


@pytest.mark.slurm
def test_a_job_out_of_requeues_fails_saying_why(slurm_cluster, tmp_path):
    """USR2 with max_requeues=0: saved, not requeued, and the job FAILS with the reason (before: COMPLETED)."""
    run_dir, log = tmp_path / "run", tmp_path / "submit.out"
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster]\nmax_requeues = 0\n")
    proc = popen_cli(["submit", "--config", cfg, "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--time",
                      "00:10:00", "--tp", "2", *SHAPE, "--steps", "100000", "--wandb", "disabled",
                      "--wait", "--run-dir", run_dir], log, cwd=tmp_path)
    try:
        job_id = _wait_for_steps(proc, log, run_dir, 2, timeout=240)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        assert proc.wait(timeout=300) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert "finished: FAILED" in out and "max_requeues=0" in out and "stopped at step" in out, out


@pytest.mark.slurm
def test_a_job_that_fails_before_its_first_step_is_not_retried(slurm_cluster, tmp_path):
    """The ranks cannot import torch (a broken install on PYTHONPATH): the job fails once, is not requeued, and the
    failure is recorded with its reason."""
    from hpcmega.runs.files import RunFolder

    broken = tmp_path / "broken" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this torch install is broken')\n")
    pythonpath = os.pathsep.join(p for p in (str(broken.parent), os.environ.get("PYTHONPATH", "")) if p)
    run_dir = tmp_path / "run"
    out = run_cli(["submit", "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--time", "00:10:00", "--tp", "2",
                   *SHAPE, "--steps", "5", "--wandb", "disabled", "--env", f"PYTHONPATH={pythonpath}", "--wait",
                   "--run-dir", run_dir], cwd=tmp_path, timeout=600)
    assert out.returncode == 1 and "finished: FAILED" in out.stdout, out.stdout + out.stderr
    run = RunFolder(run_dir)
    (failure,) = run.events("failure")
    assert not failure["restarted"] and "before its first step" in failure["reason"], failure
    assert any("this torch install is broken" in line for line in failure["lines"]), failure
    assert run.attempts() == []  # no attempt got as far as the layout, and none was requeued

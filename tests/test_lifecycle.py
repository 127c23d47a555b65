"""Living with a run from its folder: `ls`, `status`, `logs [-f]`, `cancel`, `resume` -- on the real SLURM dev
cluster (submit without --wait, cancel mid-run, resume into another layout) and for local runs."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import popen_cli, run_cli

from hpcmega.checkpoint.store import list_checkpoints
from hpcmega.runs.files import RunFolder

TINY = ["--global-batch", "4", "--seq-len", "32", "--wandb", "disabled"]


def _wait_for(what: str, check, timeout: float = 240, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _status(run_dir: Path) -> str:
    r = run_cli(["status", run_dir])
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunFolder(run_dir).steps()}


@pytest.mark.slurm
def test_submit_ls_status_logs_cancel_resume_on_slurm(slurm_cluster, tmp_path):
    """submit (no --wait) -> ls/status show it RUNNING -> logs -f shows step lines -> cancel -> CANCELLED ->
    resume --tp 1 continues from the last checkpoint; every step's loss equals an uninterrupted run's."""
    steps = 40
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "life"
    r = run_cli(["submit", "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--tp", "2", "--steps", steps,
                 "--save-every", "3", *TINY, "--time", "00:10:00", "--run-dir", run_dir], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = re.search(r"submitted job (\d+)", r.stdout).group(1)
    assert f"hpcmega logs -f {run_dir}" in r.stdout

    _wait_for("the job to run a step", lambda: re.search(r"RUNNING.*\nattempts.*\n.*\nprogress +step [1-9]",
                                                         _status(run_dir)))
    ls = run_cli(["ls", runs])
    row = next(line for line in ls.stdout.splitlines() if line.startswith("life "))
    assert job_id in row and "RUNNING" in row and f"/{steps}" in row, ls.stdout

    follow_out = tmp_path / "follow.out"
    follower = popen_cli(["logs", "-f", run_dir], output=follow_out)
    try:
        _wait_for("logs -f to show step lines", lambda: re.search(rf"step \d+/{steps} \| loss",
                                                                  follow_out.read_text()))
        _wait_for("a checkpoint", lambda: [c for c in list_checkpoints(str(run_dir / "checkpoints")) if c.complete])
        cancel = run_cli(["cancel", run_dir])
        assert cancel.returncode == 0 and f"cancelled job {job_id}" in cancel.stdout, cancel.stdout + cancel.stderr
        _wait_for("CANCELLED", lambda: f"{job_id} (slurm) CANCELLED" in _status(run_dir))
        follower.wait(timeout=60)  # -f stops by itself once the job has ended
    finally:
        if follower.poll() is None:
            follower.kill()
    assert f"(job {job_id} ended: CANCELLED)" in follow_out.read_text()
    # scancel's SIGTERM is a stop signal: the ranks may still save while SLURM ends them; wait until they are gone
    _wait_for("the job to leave the queue", lambda: not subprocess.run(
        ["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())
    before = _losses(run_dir)
    assert 0 < max(before) < steps, "the job was cancelled mid-run"
    last_ckpt = [c for c in list_checkpoints(str(run_dir / "checkpoints")) if c.complete][-1].step
    again = run_cli(["cancel", run_dir])
    assert again.returncode == 2 and "nothing to cancel" in again.stderr

    resumed = run_cli(["resume", run_dir, "--tp", "1", "--wait"], cwd=tmp_path)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    assert "layout: tp=2 pp=1 dp=1 on 1 node(s) x 2 (CPU)  ->  tp=1 pp=1 dp=2 on 1 node(s) x 2 (CPU)" in out
    assert f"step-{last_ckpt:08d} (step {last_ckpt}, written with pp=1 dp=1 tp=2)" in out, out
    assert "finished: COMPLETED" in out
    status = _status(run_dir)
    assert "COMPLETED" in status and f"step {steps}/{steps}" in status and "2 submission(s)" in status

    reference = tmp_path / "reference"
    r = run_cli(["run", "--nproc", "1", "--steps", steps, *TINY, "--run-dir", reference], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    want, got = _losses(reference), _losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for s in want:
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got[s], want[s])
    # the resumed attempt's log is attempt 2; attempt 1's log is the cancelled job's
    first = run_cli(["logs", run_dir, "--attempt", "1"])
    assert f"job={job_id} restart=0 rank=0" in first.stdout and f"step {steps}/{steps}" not in first.stdout
    latest = run_cli(["logs", run_dir, "--rank", "1"])
    assert latest.returncode == 0 and "rank=1" in latest.stdout and f"job={job_id} " not in latest.stdout


def test_local_runs_show_in_ls_status_logs_ckpt_ls_and_plot(tmp_path):
    runs = tmp_path / "runs"
    r = run_cli(["run", "--nproc", "2", "--tp", "2", "--steps", "3", *TINY, "--run-dir", runs / "loc"])
    assert r.returncode == 0, r.stdout + r.stderr
    # the step line shows elapsed time and ETA (0:00 at the last step)
    assert re.search(r"step 3/3 \| loss .* \| elapsed \d+:\d\d ETA 0:00$", r.stdout, re.M), r.stdout
    ls = run_cli(["ls", runs])
    assert re.search(r"^loc +local-\d+ +COMPLETED +3/3 +\d+\.\d{4} +1 ", ls.stdout, re.M), ls.stdout
    status = _status(runs / "loc")
    assert "(local) COMPLETED, exit code 0" in status and "step 3 (pp=1 dp=1 tp=2)" in status
    logs = run_cli(["logs", runs / "loc", "--rank", "1"])
    assert logs.returncode == 0 and "rank=1" in logs.stdout
    bad = run_cli(["logs", runs / "loc", "--attempt", "3"])
    assert bad.returncode == 2 and "has 1 attempt(s); use 1..1" in bad.stderr
    assert run_cli(["status", tmp_path]).returncode == 2  # not a run folder
    ckpts = run_cli(["ckpt", "ls", runs / "loc"])  # a run folder lists its checkpoints
    assert ckpts.returncode == 0 and re.search(r"^ +3 +pp=1 dp=1 tp=2 ", ckpts.stdout, re.M), ckpts.stdout
    png = tmp_path / "loss.png"
    plot = run_cli(["plot", runs / "loc", "--out", png])
    assert plot.returncode == 0, plot.stdout + plot.stderr
    assert re.search(r"^loss +[▁▂▃▄▅▆▇█]{3}  \d\.\d{4} -> \d\.\d{4}", plot.stdout, re.M), plot.stdout
    from matplotlib.image import imread

    assert imread(png).shape[:2] == (600, 900)

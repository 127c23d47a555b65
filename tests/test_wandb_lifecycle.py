"""W&B as a monitoring tool: a resume from a checkpoint older than W&B's last step rewinds the run so every step
is in the history exactly once (read back from the offline files); metrics.jsonl marks the restart; the run config
carries the attempt, layout and git commit; `hpcmega sync` wants an API key before doing anything."""
from __future__ import annotations

import json
import subprocess

from conftest import REPO, run_cli
from wandb_reader import effective_history, read_history, read_run

from hpcmega.runs.files import RunFolder

RUN = ["run", "--nproc", "1", "--global-batch", "4", "--seq-len", "32", "--wandb", "offline"]
ENV = {"WANDB_SILENT": "true", "WANDB_MODE": "offline"}


def test_resume_before_wandbs_last_step_rewinds_so_every_step_is_logged_once(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli([*RUN, "--steps", "7", "--save-every", "3", "--wandb-group", "g1", "--wandb-tags", "a",
                     "--wandb-tags", "b", "--run-dir", run_dir], env=ENV)
    assert first.returncode == 0, first.stdout + first.stderr
    # resume from step 6 although W&B has step 7 already (as after a crash between a log and the next save)
    step6 = run_dir / "checkpoints" / "step-00000006"
    second = run_cli([*RUN, "--steps", "10", "--resume", step6, "--run-dir", run_dir], env=ENV)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stdout + second.stderr

    files = [next(d.glob("run-*.wandb")) for d in sorted(run_dir.glob("wandb/offline-run-*"))]
    assert len(files) == 2
    assert [r["_step"] for r in read_history(files[0])[1]] == list(range(1, 8))
    second_run = read_run(files[1])
    assert second_run["config"]["_wandb"]["branch_point"] == {"run_id": second_run["run_id"], "step": 6}
    rows = effective_history(files)
    assert [r["_step"] for r in rows] == list(range(1, 11))  # every step exactly once
    final = {r["step"]: r for r in RunFolder(run_dir).steps()}
    assert all(r["loss"] == final[r["_step"]]["loss"] for r in rows)
    assert rows[6]["attempt"] == 2 and rows[0]["attempt"] == 1  # the attempt marker on each attempt's first step

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    restart = [e for e in events if e.get("event") == "restart"]
    assert len(restart) == 1 and restart[0]["attempt"] == 2 and restart[0]["last_step_before"] == 7
    after = events[events.index(restart[0]) + 1:]
    assert [e["step"] for e in after] == [7, 8, 9, 10]  # step 7 again, after the marker, replacing the old one

    config = read_run(files[0])
    assert config["group"] == "g1" and config["tags"] == ["a", "b"]
    system = config["config"]["system"]
    assert system["attempt"] == 1 and system["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    head = subprocess.run(["git", "-C", str(REPO / "hpcmega"), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert system["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert system["slurm_job_id"] is None  # a local run
    assert read_run(files[1])["config"]["system"]["attempt"] == 2


def test_sync_asks_for_the_api_key_before_doing_anything(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}
    r = run_cli(["sync", run_dir], env=env)
    assert r.returncode == 2 and "no W&B API key: export WANDB_API_KEY" in r.stderr, r.stdout + r.stderr
    assert "syncing" not in r.stdout

"""W&B offline: the logged losses are metrics.jsonl's, a resumed run continues the same run id, no secret leaks."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

from conftest import run_cli
from wandb_reader import read_history

from hpcmega.runs.files import RunFolder

RUN = ["run", "--nproc", "1", "--global-batch", "4", "--seq-len", "32", "--wandb", "offline"]


def test_offline_run_resumes_the_same_wandb_run_and_never_writes_the_api_key(tmp_path):
    key = "sk-" + secrets.token_hex(20)
    run_dir = tmp_path / "run"
    env = {"WANDB_API_KEY": key, "WANDB_SILENT": "true"}
    first = run_cli([*RUN, "--steps", "3", "--run-dir", run_dir], env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_cli([*RUN, "--steps", "6", "--run-dir", run_dir], env=env, timeout=300)  # resume=auto: steps 4-6
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stdout + second.stderr

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    attempts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(attempts) == 2, attempts
    records = RunFolder(run_dir).metrics()
    # each step logged once, in order, and one restart marker where the second attempt begins
    assert [r.get("step") for r in records] == [1, 2, 3, None, 4, 5, 6]
    assert records[3]["event"] == "restart" and records[3]["last_step_before"] == 3
    metrics = {r["step"]: r for r in records if "event" not in r}
    logged = {}
    for folder in attempts:
        (wandb_file,) = folder.glob("run-*.wandb")
        file_id, rows = read_history(wandb_file)
        assert file_id == run_id
        logged.update({row["_step"]: row for row in rows})
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, rec in metrics.items():
        assert logged[step]["loss"] == rec["loss"] and logged[step]["lr"] == rec["lr"]
        assert logged[step]["mem_peak_gib"] == rec["mem_peak_gib"] > 0 and logged[step]["skipped_steps"] == 0
    meta = json.loads(sorted((run_dir / "checkpoints").glob("step-*/meta.json"))[-1].read_text())
    assert meta["wandb_run_id"] == run_id

    for path in Path(run_dir).rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"{path} contains the API key"

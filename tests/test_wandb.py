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


def test_a_wandb_failure_warns_once_and_never_stops_training(tmp_path, monkeypatch, capsys):
    """A bad API key (wandb.init raises at the first step): one warning, W&B off, every later step still logged
    to metrics.jsonl by the trainer (main: the exception ended training with a traceback on rank 0)."""
    from hpcmega.config import Config
    from hpcmega.training.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_API_KEY", "bad")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no network either
    cfg = Config()
    cfg.logging.wandb = "online"
    logger = WandbLogger(cfg, str(tmp_path))
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0})
    logger.finish()
    out = capsys.readouterr().out
    assert out.count("warning: W&B online logging failed") == 1 and "metrics.jsonl" in out, out
    assert "API key" in out, out  # the reason, as wandb gave it

"""The run folder and the names of everything in it (one owner: nothing else spells these names).

A run folder is created by `hpcmega run` or `hpcmega submit` and holds a run across all its attempts:

    config.toml      the resolved config (written at submission, rewritten by rank 0 at every start)
    layout.json      the layout of the latest attempt (rank 0)
    jobs.jsonl       one line per submission: SLURM job (id, submitit folder) or local launch (pid, host); a local
                     launch adds a line with its exit code when it ends
    attempts.jsonl   one line per start of the ranks (requeues and resumes included): job id, restart count, nodes;
                     and the attempts' events: {"event": "trained" | "finished" | "stop" | "failure", ...}
                     (see record_event)
    metrics.jsonl    one line per step (rank 0), plus {"event": "restart", ...} lines marking each new attempt
    checkpoints/     DCP checkpoints (unless checkpoint.url points elsewhere)
    logs/rankN.log   local runs: each rank's output, appended across attempts
    slurm/<stamp>/   SLURM runs: submitit's folder per submission (scripts, <jobid>_<rank>_log.out/.err, results)
    wandb_run_id     the W&B run id shared by every attempt; wandb/ holds the offline W&B files
    debug/           evidence of a hang or failure, per rank: fr_trace_rank_N (the collectives flight recorder: NCCL's
                     own dump on a timeout, or the gloo equivalent) and stacks_rank_N.txt (every thread's stack);
                     see hpcmega.training.hang_evidence and docs/runtime.md

Every log section of an attempt starts with the line from ``attempt_marker`` (printed by each rank), so `logs
--attempt K` can cut one attempt out of a log file that SLURM appends across requeues.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcmega.config import Config

CONFIG = "config.toml"
LAYOUT = "layout.json"
JOBS = "jobs.jsonl"
ATTEMPTS = "attempts.jsonl"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
SLURM = "slurm"
WANDB_ID = "wandb_run_id"
WANDB_DIR = "wandb"
LOCK = ".hpcmega.lock"  # who uses the folder now (hpcmega.runs.lock)
DEBUG = "debug"
FR_TRACE_PREFIX = "fr_trace_rank_"  # + rank: torch's flight recorder appends the rank to its dump path

# Set by the local launcher for its ranks: the id of a local launch ("local-<launcher pid>").
LOCAL_JOB_ENV = "HPCMEGA_LOCAL_JOB"
_MARKER = "==> hpcmega attempt: job={job} restart={restart} rank={rank} <=="
_MARKER_RE = re.compile(r"^==> hpcmega attempt: job=(\S+) restart=(\d+) rank=(\d+) <==$", re.M)


def fr_trace_name(rank: int) -> str:
    return f"{FR_TRACE_PREFIX}{rank}"


def stacks_name(rank: int) -> str:
    return f"stacks_rank_{rank}.txt"


def attempt_marker(job: str, restart: int, rank: int) -> str:
    return _MARKER.format(job=job, restart=restart, rank=rank)


def job_key() -> str | None:
    """The id this attempt's job has in jobs.jsonl: the local launch's (also when `hpcmega run` is started inside
    a SLURM allocation, whose SLURM_JOB_ID its ranks inherit), else the SLURM job's as submitit names it
    (``<array>_<index>`` inside a job array), or None outside both."""
    return os.environ.get(LOCAL_JOB_ENV) or slurm_job_id()


def log_section(text: str, job: str, restart: int) -> str:
    """The part of a log that one attempt (job, restart count) wrote; the whole text if it has no markers."""
    marks = list(_MARKER_RE.finditer(text))
    if not marks:
        return text
    for i, m in enumerate(marks):
        if m.group(1) == job and int(m.group(2)) == restart:
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            return text[m.start():end]
    return ""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line (a line cut by a killed writer, or anything but an object, is skipped)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, or nested too deeply
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    """One run's folder. The commands decide it once (``decide``) and ``bind`` the config to it; everything after
    that -- the checks, the job script, the launcher, the ranks -- reads the folder from the bound config
    (``of``) instead of being handed it again."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.given = Path(path)  # as the user wrote it (messages)
        self.path = self.given.absolute()

    @classmethod
    def decide(cls, run_dir: str | os.PathLike | None, cfg: Config, root: str | os.PathLike = "runs") -> RunFolder:
        """``--run-dir`` as given, else ``runs/<YYYYmmdd-HHMMSS>-<name>`` (name = logging.run_name or the model
        preset), never an existing folder."""
        if run_dir:
            return cls(run_dir)
        base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.logging.run_name or cfg.model.preset}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return cls(path)

    @classmethod
    def of(cls, cfg: Config) -> RunFolder:
        """The folder a bound config names."""
        if not cfg.run_dir:
            raise ValueError("this config is bound to no run folder (RunFolder.bind)")
        return cls(cfg.run_dir)

    def bind(self, cfg: Config) -> Config:
        """A copy of ``cfg`` whose run_dir is this folder (absolute): the job name, the container mounts, the
        config.toml the run keeps and the ranks all follow it."""
        return dataclasses.replace(cfg, run_dir=str(self.path))

    def point(self, name: str) -> RunFolder:
        """A sweep point's own run folder inside this one."""
        return RunFolder(self.given / name)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    def is_run(self) -> bool:
        return (self.path / CONFIG).is_file() or (self.path / JOBS).is_file()

    # -- what the run wrote ------------------------------------------------------------------------------------------
    def config(self):
        from hpcmega.config import load_config

        return load_config(self.path / CONFIG)

    def layout(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.path / LAYOUT).read_text())
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def jobs(self) -> list[dict[str, Any]]:
        """Submissions, oldest first, with a local launch's end record merged into its start record."""
        merged: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl(self.path / JOBS):
            merged.setdefault(str(rec.get("job_id")), {}).update(rec)
        return list(merged.values())

    def attempts(self) -> list[dict[str, Any]]:
        """One record per start of the ranks, oldest first (events excluded)."""
        return [r for r in read_jsonl(self.path / ATTEMPTS) if "event" not in r]

    def events(self, event: str, job_id: str | None = None) -> list[dict[str, Any]]:
        """The attempts' ``event`` records (of one job if ``job_id`` is given), oldest first."""
        return [r for r in read_jsonl(self.path / ATTEMPTS)
                if r.get("event") == event and (job_id is None or str(r.get("job_id")) == str(job_id))]

    def crash_restarts(self, job_id: str) -> int:
        """How many times the job requeued itself after a crash (hpcmega.cluster.restarts); its preemption
        requeues have their own budget."""
        return sum(1 for r in self.events("failure", job_id) if r.get("restarted"))

    def finished(self, job_id: str, restart_count: int = 0) -> bool:
        """Whether that attempt of the job finished training and saved on every rank (rank 0 records it after
        the final barrier): a rank that dies after it, at interpreter exit, does not make the run a failure."""
        return any(int(r.get("restart_count", 0)) == restart_count for r in self.events("finished", job_id))

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def steps(self) -> list[dict[str, Any]]:
        """Step records (no event lines, none without an integer step); after a restart from an earlier step, the
        later record of a step wins."""
        by_step: dict[int, dict[str, Any]] = {}
        for rec in self.metrics():
            step = rec.get("step")
            if isinstance(step, int) and not isinstance(step, bool) and "event" not in rec:
                by_step[step] = rec
        return [by_step[s] for s in sorted(by_step)]

    def wandb_id(self) -> str | None:
        try:
            return (self.path / WANDB_ID).read_text().strip() or None
        except OSError:
            return None

    def checkpoint_url(self, cfg=None) -> str:
        cfg = cfg if cfg is not None else self.config()
        return cfg.checkpoint.url or str(self.path / CHECKPOINTS)

    def debug_files(self) -> list[Path]:
        """The hang/failure evidence the ranks wrote (non-empty files of debug/), by name."""
        folder = self.path / DEBUG
        return sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_size) if folder.is_dir() else []

    def local_log(self, rank: int) -> Path:
        return self.path / LOGS / f"rank{rank}.log"

    def submission_folder(self) -> Path:
        """A fresh folder per submission: SLURM job ids restart at 1 on a new cluster, and submitit must never
        find another job's pickles or logs under the same id."""
        import uuid

        return self.path / SLURM / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def updated(self) -> float:
        """When the run last wrote anything we read (metrics, attempts, jobs)."""
        times = [p.stat().st_mtime for p in (self.path / METRICS, self.path / ATTEMPTS, self.path / JOBS)
                 if p.exists()]
        return max(times, default=self.path.stat().st_mtime if self.path.exists() else 0.0)

    # -- what the launchers write ----------------------------------------------------------------------------------
    def record_job(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / JOBS, {"time": time.time(), **record})

    def record_attempt(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / ATTEMPTS, {"time": time.time(), **record})

    def record_event(self, event: str, record: dict[str, Any]) -> None:
        """An attempt's event: "trained" (its first step is done), "finished" (every rank trained and saved),
        "stop" (a stop signal; the ranks saved), "failure" (the job step failed: exit status, first lines,
        whether it was restarted)."""
        append_jsonl(self.path / ATTEMPTS, {"event": event, "time": time.time(), **record})

    def mark_restart(self, record: dict[str, Any]) -> None:
        """An ``{"event": "restart", ...}`` line in metrics.jsonl before a new attempt's first step."""
        append_jsonl(self.path / METRICS, {"event": "restart", "time": time.time(), **record})

    def write_config(self, text: str) -> None:
        write_atomic(self.path / CONFIG, text)

    def write_layout(self, data: dict[str, Any]) -> None:
        write_atomic(self.path / LAYOUT, json.dumps(data, indent=2) + "\n")


def checkpoints_of(url_or_run: str) -> str:
    """A run folder -> where its checkpoints are (its config's ``checkpoint.url``, else RUN/checkpoints); anything
    else (a URL or folder holding step folders) as it is."""
    run = RunFolder(url_or_run)
    if "://" in url_or_run or not (run / CONFIG).is_file():
        return url_or_run
    return run.checkpoint_url()


def enclosing_run(target: str) -> RunFolder | None:
    """The run folder that ``target`` is, or holds as its checkpoints folder or one of its step folders (local
    paths; None for URLs and anything else)."""
    if "://" in target:
        return None
    path = Path(target).absolute()
    for folder in (path, path.parent, path.parent.parent):
        if (folder / CONFIG).is_file():
            return RunFolder(folder)
    return None


def find_runs(root: str | os.PathLike, depth: int = 2) -> list[RunFolder]:
    """Run folders under ``root`` (itself, its children, and theirs: a sweep keeps its points in one folder)."""
    base = Path(root)
    found: list[RunFolder] = []
    frontier = [base]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            run = RunFolder(d)
            if run.is_run():
                found.append(run)
            elif d.is_dir():
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        frontier = nxt
    return sorted(found, key=lambda r: r.path)


def slurm_job_id() -> str | None:
    # For array jobs, requeue the array task's own id.
    return os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    ) or os.environ.get("SLURM_JOB_ID")

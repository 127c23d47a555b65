"""What a run folder says about its run: the current job and its state, progress, attempts, checkpoint, W&B id.

SLURM jobs are looked at through submitit's own job objects (``submitit.SlurmJob``: its sacct watcher for the
state, its paths for the logs, ``cancel()``), rebuilt from the job id and submitit folder that jobs.jsonl keeps.
Local launches (`hpcmega run`) are judged by their launcher's pid and the exit code it recorded.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcmega.cluster import slurm
from hpcmega.errors import EXIT_UNFINISHED
from hpcmega.runs.files import RunFolder
from hpcmega.runs.progress import eta_s

# States after which a job will not run again (the same set `submit --wait` uses).
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "STOPPED", "SIGNALING", "STAGE_OUT"}


@dataclass(frozen=True)
class SchedulerTrouble:
    """What refresh_slurm_states found wrong with SLURM: the one line to show, and whether squeue still answers
    (controller up, accounting down: states come from squeue; controller down: UNKNOWN)."""

    note: str
    queue_answers: bool


@dataclass
class Job:
    """One submission of the run (a SLURM job or a local launch), as recorded in jobs.jsonl."""

    record: dict[str, Any]
    trouble: SchedulerTrouble | None = None  # set by refresh_slurm_states when SLURM cannot be asked as usual

    @property
    def job_id(self) -> str:
        return str(self.record.get("job_id"))

    @property
    def kind(self) -> str:
        return self.record.get("kind", "slurm")

    def submitit_job(self):
        """submitit's handle of this SLURM job (all its tasks)."""
        import submitit

        return submitit.SlurmJob(folder=self.record["folder"], job_id=self.job_id,
                                 tasks=tuple(range(int(self.record.get("tasks", 1)))))

    def log_path(self, rank: int, stream: str, run: RunFolder) -> Path:
        if self.kind == "local":
            return run.local_log(rank)
        paths = self.submitit_job().task(rank).paths
        return paths.stdout if stream == "out" else paths.stderr

    def _local_alive(self) -> bool:
        if self.record.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(self.record["pid"]), 0)
        except (OSError, ValueError, KeyError):
            return False
        return True

    def state(self) -> str:
        if self.kind == "local":
            if "exit_code" in self.record:
                code = int(self.record["exit_code"])
                if code == EXIT_UNFINISHED:
                    return "UNFINISHED"  # a stop signal: saved, resumable (SLURM's STOPPED is a live job)
                return "COMPLETED" if code == 0 else "CANCELLED" if code in (128 + signal.SIGINT,
                                                                           128 + signal.SIGTERM) else "FAILED"
            return "RUNNING" if self._local_alive() else "LOST"  # the launcher died without recording an end
        if self.trouble:
            return slurm.job_state(self.job_id) if self.trouble.queue_answers else "UNKNOWN"
        state = slurm.normalise_state(self.submitit_job().watcher.get_state(self.job_id, mode="cache"))
        return state if state != "UNKNOWN" else slurm.job_state(self.job_id)

    def exit_code(self) -> str:
        if self.kind == "local":
            return str(self.record.get("exit_code", ""))
        if self.trouble:
            return ""  # only accounting (sacct) knows it
        return slurm.job_exit_code(self.job_id)

    def cancel(self) -> None:
        if self.kind == "local":
            if not self._local_alive():
                raise RuntimeError(f"local run {self.job_id} is not running on this host")
            os.kill(int(self.record["pid"]), signal.SIGTERM)  # the ranks save at the next step boundary and stop
        else:
            self.submitit_job().cancel(check=True)


def refresh_slurm_states(jobs: list[Job]) -> SchedulerTrouble | None:
    """One sacct call (submitit's watcher) for all SLURM jobs about to be shown. When SLURM cannot answer --
    controller down (squeue would retry for ~18 s), or accounting down (sacct and submitit print raw errors) --
    the jobs are marked with what is wrong, in one line ("SLURM controller unreachable: ..."), which is returned."""
    mine = [j for j in jobs if j.kind == "slurm" and j.record.get("folder")]
    if not mine:
        return None
    from hpcmega.cluster.slurm import accounting_problem, controller_problem

    trouble = None
    if problem := controller_problem():
        trouble = SchedulerTrouble(f"SLURM controller unreachable: {problem}; job states are UNKNOWN", False)
    elif problem := accounting_problem([j.job_id for j in mine]):
        trouble = SchedulerTrouble(f"SLURM accounting unreachable: {problem}; job states from squeue", True)
    else:
        mine[0].submitit_job().watcher.update()
    for job in mine:
        job.trouble = trouble
    return trouble


@dataclass
class RunStatus:
    run: RunFolder
    job: Job | None
    state: str
    step: int = 0
    steps: int = 0
    loss: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float | None = None
    eta_s: float | None = None
    updated: float = 0.0
    trouble: SchedulerTrouble | None = None  # what kept SLURM from answering as usual, if anything

    @property
    def attempt(self) -> int:
        return len(self.attempts)


def progress(records: list[dict[str, Any]], steps: int) -> tuple[float | None, float | None]:
    """(elapsed, eta) in seconds from step records: the training time of every step the run kept (all attempts),
    and the ETA the step line shows (hpcmega.runs.progress)."""
    if not records:
        return None, None
    times = [r["step_time_s"] if isinstance(r.get("step_time_s"), (int, float)) else 0.0 for r in records]
    return sum(times), eta_s(times, steps - records[-1]["step"])


def run_status(run: RunFolder, refresh: bool = True, trouble: SchedulerTrouble | None = None) -> RunStatus:
    """The run's status; ``refresh``: ask SLURM for its job's state first (`ls` asks once for all runs and passes
    what it found: ``trouble``)."""
    jobs = [Job(r) for r in run.jobs()]
    job = jobs[-1] if jobs else None
    if job is not None and refresh:
        trouble = refresh_slurm_states([job])
    elif job is not None and job.kind == "slurm":
        job.trouble = trouble
    state = job.state() if job is not None else "UNKNOWN"
    try:
        steps = run.config().train.steps
    except Exception:  # a folder from another version: show what can be shown
        steps = 0
    records = run.steps()
    elapsed, eta = progress(records, steps)
    last = records[-1] if records else {}
    return RunStatus(run=run, job=job, state=state, step=int(last.get("step", 0)), steps=steps,
                     loss=last.get("loss"), attempts=run.attempts(), elapsed_s=elapsed,
                     eta_s=eta if state in ACTIVE else None, updated=run.updated(), trouble=trouble)


def ago(t: float) -> str:
    d = max(0.0, time.time() - t)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"

"""A crashed attempt restarts itself: after a failed job step, the batch script asks this module whether to requeue.

Why the decision sits in the batch script, after ``srun``: a rank that dies (SIGKILL, heap corruption, a gloo or
NCCL error, a lost peer) ends the whole step (``srun --kill-on-bad-exit``), so no rank is left to requeue the job
the way USR2 does; and SLURM's own ``--requeue`` only covers node failures and preemption. The batch script
outlives the step, so its last lines (submitit's ``teardown``) run ``python -m hpcmega.cluster.restarts`` and, when
told to, ``scontrol requeue`` the job: the next attempt is a fresh allocation (a bad node may be left out), with its
own ``SLURM_RESTART_COUNT``, log sections and attempt record, and resumes from the newest intact checkpoint with
``--resume auto`` like any requeue. (An srun retry loop inside the allocation would keep a bad node and reuse the
attempt's restart count; submitit's checkpointing only handles timeouts and preemption, not crashes.)

What is restarted: an attempt that trained at least one step, with an intact checkpoint to resume from, at most
``cluster.max_restarts`` times per job (counted from the failures recorded here; preemption requeues have their
own budget, ``cluster.max_requeues``). A failure before the first step (bad config, import error, a broken node at
start) is not retried: the next attempt would fail the same way. An attempt that had finished and saved on every
rank is a success whatever a rank did at exit; one that stopped on a signal is ended by SLURM, not by a crash.
Every decision is one ``failure`` event in attempts.jsonl with the failure's first lines (``hpcmega status``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcmega.checkpoint.store import by_save_order, list_checkpoints
from hpcmega.runs.files import RunFolder, log_section, slurm_job_id

# Lines of a failed step worth showing, in the order they are looked for in each rank's stderr.
_FAILURE = re.compile(r"srun: error|error|Error|Killed|killed|terminate called|malloc|Aborted|Segmentation|core "
                      r"dumped|signal|Exception")
FIRST_LINES = 5


@dataclass(frozen=True)
class Decision:
    action: str  # "requeue", "finished" (exit 0: the run had finished), "stop" (a stop signal), "fail"
    reason: str


def decide(run: RunFolder, job: str, restart_count: int, max_restarts: int, requeue_allowed: bool) -> Decision:
    """What to do after attempt ``restart_count`` of ``job`` ended with a failed job step, from the run folder's
    records and checkpoints."""
    def this_attempt(event: str) -> bool:
        return any(int(r.get("restart_count", 0)) == restart_count for r in run.events(event, job))

    if run.finished(job, restart_count):
        return Decision("finished", "every rank had finished and saved before a rank ended badly; the run is "
                                    "complete")
    if this_attempt("stop"):
        return Decision("stop", "the attempt stopped on a signal and saved; SLURM ends it")
    if not this_attempt("trained"):
        return Decision("fail", "failed before its first step: not restarted (the next attempt would fail the "
                                "same way)")
    if not [c for c in by_save_order(list_checkpoints(run.checkpoint_url())) if c.usable]:
        return Decision("fail", "no intact checkpoint to resume from yet: not restarted")
    restarts = run.crash_restarts(job)
    if not requeue_allowed:
        return Decision("fail", "the job was submitted with --no-requeue: not restarted")
    if restarts >= max_restarts:
        return Decision("fail", f"restarted {restarts} time(s) already (cluster.max_restarts={max_restarts}): "
                                "not restarted")
    return Decision("requeue", f"restarting from the newest intact checkpoint (restart {restarts + 1} of "
                               f"{max_restarts})")


def first_lines(logs: list[Path], job: str, restart_count: int, limit: int = FIRST_LINES) -> list[str]:
    """The failure's first lines: from each rank's stderr (this attempt's section; rank 0's also holds srun's own
    messages), the lines that name an error, srun's first."""
    found: list[str] = []
    for path in logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        section = log_section(text, job, restart_count) or "\n".join(text.splitlines()[-50:])
        found += [line.strip()[:300] for line in section.splitlines() if _FAILURE.search(line)]
    ordered = [x for x in found if x.startswith("srun: error")] + [x for x in found if not x.startswith("srun:")]
    return list(dict.fromkeys(ordered))[:limit]


def after_failed_step(folder: Path, status: int) -> Decision:
    """Record the failure of this attempt (SLURM's environment names the job) and decide what comes next."""
    import submitit

    job = slurm_job_id() or ""
    restart_count = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    submission = submitit.helpers.DelayedSubmission.load(submitit.core.utils.JobPaths(folder, job).submitted_pickle)
    run = RunFolder(submission.args[1])
    cfg = run.config()
    decision = decide(run, job, restart_count, cfg.cluster.max_restarts, cfg.cluster.requeue)
    if decision.action in ("requeue", "fail"):
        logs = [submitit.core.utils.JobPaths(folder, job, task).stderr for task in range(cfg.world_size)]
        run.record_event("failure", {"job_id": job, "restart_count": restart_count, "exit_status": status,
                                     "lines": first_lines(logs, job, restart_count),
                                     "restarted": decision.action == "requeue", "reason": decision.reason})
    return decision


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcmega.cluster.restarts SUBMITIT_FOLDER STATUS`` (the job script's teardown): prints
    ``requeue`` / ``finished`` / ``stop`` / ``fail`` on stdout and the reason on stderr. Never fails itself: any
    error here is a ``fail`` (the job then ends with the step's status, as without this module)."""
    parser = argparse.ArgumentParser(prog="python -m hpcmega.cluster.restarts")
    parser.add_argument("folder", type=Path)
    parser.add_argument("status", type=int)
    args = parser.parse_args(argv)
    try:
        decision = after_failed_step(args.folder, args.status)
    except Exception as e:  # noqa: BLE001 - the job must still end with the step's own status
        decision = Decision("fail", f"could not decide ({type(e).__name__}: {e}): not restarted")
    print(f"hpcmega: the job step failed (status {args.status}); {decision.reason}", file=sys.stderr, flush=True)
    print(decision.action, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

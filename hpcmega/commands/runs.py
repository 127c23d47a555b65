"""`hpcmega ls | status | logs | cancel`: living with runs, from their run folders (local and SLURM alike)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from hpcmega.errors import ConfigError

_RUN = click.argument("run", type=click.Path(exists=True, file_okay=False))


def run_folder_arg(path: str):
    from hpcmega.runs.files import RunFolder

    run = RunFolder(path)
    if not run.is_run():
        raise ConfigError(f"{path} is not a run folder (no config.toml or jobs.jsonl); `hpcmega ls` lists runs")
    return run


# What a damaged run folder (a hand-edited or foreign jobs.jsonl / metrics.jsonl line) raises while it is read.
DAMAGE = (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError)


def damage(e: Exception) -> str:
    """One line for a damaged run folder."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"damaged run folder ({type(e).__name__}: {first}); check its jobs.jsonl and metrics.jsonl"


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


@click.command("ls")
@click.argument("runs_dir", default="runs", type=click.Path(file_okay=False))
def ls(runs_dir: str) -> None:
    """One line per run under RUNS_DIR (default: runs): job, state, progress, loss, attempt, last update."""
    from hpcmega.runs.files import find_runs
    from hpcmega.runs.progress import duration
    from hpcmega.cluster.jobs import Job, ago, refresh_slurm_states, run_status

    try:
        runs = find_runs(runs_dir) if Path(runs_dir).is_dir() else []
    except OSError as e:  # a name too long, a folder that cannot be read
        raise ConfigError(f"cannot read {runs_dir[:80]}: {e.strerror or e}") from None
    if not runs:
        raise ConfigError(f"no run folders under {runs_dir}; start one with `hpcmega run` or `hpcmega submit`")
    trouble = refresh_slurm_states([Job(r.jobs()[-1]) for r in runs if r.jobs()])
    if trouble:
        click.echo(f"warning: {trouble.note}", err=True)
    rows = [("RUN", "JOB", "STATE", "STEP", "LOSS", "ATTEMPT", "ELAPSED", "ETA", "UPDATED")]
    for run in runs:
        name = str(run.path.relative_to(Path(runs_dir).absolute())) if run.path != Path(runs_dir).absolute() \
            else run.name
        try:
            s = run_status(run, refresh=False, trouble=trouble)
            rows.append((name, s.job.job_id if s.job else "-", s.state, f"{s.step}/{s.steps}", _loss(s.loss),
                         str(s.attempt), duration(s.elapsed_s), duration(s.eta_s), ago(s.updated)))
        except DAMAGE as e:  # one damaged folder must not hide every other run
            click.echo(f"warning: skipping {name}: {damage(e)}", err=True)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@click.command("status")
@_RUN
def status(run: str) -> None:
    """Job state, exit code, attempts, progress, last checkpoint, W&B run and layout of RUN."""
    from hpcmega.cluster.jobs import run_status

    folder = run_folder_arg(run)
    try:
        s = run_status(folder)
        rows = _status_rows(folder, s)
    except DAMAGE as e:
        raise click.ClickException(f"{folder.path}: {damage(e)}") from None
    if s.trouble:
        click.echo(f"warning: {s.trouble.note}", err=True)
    for key, value in rows:
        click.echo(f"{key:<11}{value}")


def _status_rows(folder, s) -> list[tuple[str, str]]:
    from hpcmega.checkpoint.store import latest_checkpoint, list_checkpoints
    from hpcmega.runs.progress import duration

    rows: list[tuple[str, str]] = [("run", str(folder.path))]
    if s.job:
        code = s.job.exit_code()
        rows.append(("job", f"{s.job.job_id} ({s.job.kind}) {s.state}" + (f", exit code {code}" if code else "")))
    else:
        rows.append(("job", "none recorded"))
    requeues = sum(1 for a in s.attempts if a.get("restart_count", 0) > 0)
    failures = folder.events("failure")
    crashes = sum(1 for f in failures if f.get("restarted"))
    rows.append(("attempts", f"{s.attempt} ({requeues} requeue(s)" + (f", {crashes} after a crash" if crashes else "")
                 + f", {len(folder.jobs())} submission(s))"))
    for f in failures[-3:]:  # what ended the latest failed attempts, and what happened next
        rows.append(("failure", f"job {f.get('job_id')} restart {f.get('restart_count', 0)}: step status "
                                f"{f.get('exit_status')}; {f.get('reason', '')}"))
        rows += [("", f"  {line}") for line in f.get("lines", [])]
    if s.attempts:
        a = s.attempts[-1]
        lay = a.get("layout") or {}
        rows.append(("latest", f"job {a.get('job_id')} restart {a.get('restart_count', 0)} on "
                               f"{', '.join(a.get('nodes', []))}" + (f" tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}"
                                                                      if lay else "")))
    rows.append(("progress", f"step {s.step}/{s.steps}, loss {_loss(s.loss)}, elapsed {duration(s.elapsed_s)}, "
                             f"ETA {duration(s.eta_s)}"))
    debug = folder.debug_files()
    if debug:  # a rank failed or hung (hpcmega.training.hang_evidence); how to read them: docs/runtime.md
        rows.append(("debug", f"hang evidence: {len(debug)} file(s) in {debug[0].parent} ("
                              f"{', '.join(p.name for p in debug[:4])}{', ...' if len(debug) > 4 else ''}); how to "
                              "read them: docs/runtime.md"))
    try:
        cfg = folder.config()
        latest = latest_checkpoint(list_checkpoints(folder.checkpoint_url(cfg)))
        rows.append(("checkpoint", f"step {latest.step} ({latest.layout}) {latest.url}" if latest else "none yet"))
        rows.append(("plan", f"{cfg.model.preset} ({cfg.model.n_layers} layers), {cfg.cluster.nodes} node(s) x "
                             f"{cfg.cluster.gpus_per_node}, tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.dp}, "
                             f"global_batch={cfg.train.global_batch}"))
        wandb_id = folder.wandb_id()
        rows.append(("W&B", f"{cfg.logging.wandb}" + (f", run id {wandb_id}" if wandb_id else "")
                     + (f" (upload: hpcmega sync {folder.path})" if cfg.logging.wandb == "offline" and wandb_id
                        else "")))
    except Exception as e:  # noqa: BLE001 - a folder without a readable config still has a state
        rows.append(("config", f"unreadable ({e})"))
    return rows


def _attempt_job(folder, attempt: int | None):
    """-> (Job, restart count) of attempt K (1-based; default: the latest submission, at its latest restart)."""
    from hpcmega.cluster.jobs import Job

    jobs = {str(j.get("job_id")): Job(j) for j in folder.jobs()}
    if not jobs:
        raise ConfigError(f"{folder.name} records no job ({folder.path / 'jobs.jsonl'} is missing)")
    attempts = folder.attempts()
    if attempt is not None:
        if not 1 <= attempt <= len(attempts):
            raise ConfigError(f"--attempt {attempt}: {folder.name} has {len(attempts)} attempt(s)"
                              + (f"; use 1..{len(attempts)}" if attempts else " so far"))
        a = attempts[attempt - 1]
        job = jobs.get(str(a.get("job_id")))
        if job is None:
            raise ConfigError(f"attempt {attempt} ran as job {a.get('job_id')}, which jobs.jsonl does not list")
        return job, int(a.get("restart_count", 0))
    latest = list(jobs.values())[-1]
    mine = [a for a in attempts if str(a.get("job_id")) == latest.job_id]
    return latest, int(mine[-1].get("restart_count", 0)) if mine else 0


@click.command("logs")
@_RUN
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job ends (Ctrl-C stops).")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True, help="Global rank.")
@click.option("--attempt", type=click.IntRange(min=1), help="Attempt number (see `status`); default: the latest.")
@click.option("--err", "stderr", is_flag=True, help="SLURM runs: the rank's stderr instead of stdout.")
def logs(run: str, follow: bool, rank: int, attempt: int | None, stderr: bool) -> None:
    """Print one rank's log of one attempt of RUN (rank 0 of the latest attempt by default)."""
    from hpcmega.runs.files import log_section
    from hpcmega.cluster.jobs import ACTIVE

    folder = run_folder_arg(run)
    job, restart = _attempt_job(folder, attempt)
    job_id = job.job_id
    world = int(job.record.get("tasks") or job.record.get("nproc") or 1)
    if rank >= world:
        raise ConfigError(f"--rank {rank}: job {job_id} has {world} rank(s); use 0..{world - 1}")
    path = job.log_path(rank, "err" if stderr else "out", folder)
    text = path.read_text(errors="replace") if path.exists() else ""
    shown = log_section(text, job_id, restart) if text else ""
    click.echo(shown, nl=False)
    if not follow:
        if not path.exists():
            click.echo(f"(no log yet: {path}; job {job_id} is {job.state()})", err=True)
        return
    offset = len(text.encode())
    try:
        while True:
            offset = _print_new(path, offset)
            from hpcmega.cluster.jobs import refresh_slurm_states

            refresh_slurm_states([job])
            if job.state() not in ACTIVE:
                _print_new(path, offset)
                click.echo(f"(job {job_id} ended: {job.state()})", err=True)
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        return


def _print_new(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    end = chunk.rfind(b"\n") + 1  # whole lines only
    if end:
        click.echo(chunk[:end].decode(errors="replace"), nl=False)
        sys.stdout.flush()
    return offset + end


@click.command("cancel")
@_RUN
def cancel(run: str) -> None:
    """Cancel RUN's current job (SLURM job or local launch); both save at the next step boundary first (a local
    run is asked like Ctrl-C would). The run folder stays resumable: `hpcmega resume RUN` continues from there."""
    from hpcmega.cluster.jobs import ACTIVE, run_status

    folder = run_folder_arg(run)
    s = run_status(folder)
    if s.job is None or s.state not in ACTIVE:
        raise ConfigError(f"{folder.name}: nothing to cancel (job {s.job.job_id if s.job else '-'} is "
                          f"{s.state})")
    try:
        s.job.cancel()
    except Exception as e:  # scancel refused (not your job, ...) or the local launcher is elsewhere
        raise click.ClickException(f"could not cancel job {s.job.job_id}: {e}") from None
    if s.job.kind == "local":
        click.echo(f"asked local run {s.job.job_id} to save at its next step boundary and stop; resume with: "
                   f"hpcmega resume {folder.path}")
        return
    click.echo(f"cancelled job {s.job.job_id} ({s.job.kind}, was {s.state}); resume with: hpcmega resume "
               f"{folder.path}")


def register(main: click.Group) -> None:
    for command in (ls, status, logs, cancel):
        main.add_command(command)

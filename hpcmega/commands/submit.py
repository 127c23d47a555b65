"""`hpcmega submit`: validate, then queue the job on SLURM through submitit (or show the sbatch script)."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import click

from hpcmega.commands.options import pass_config
from hpcmega.errors import ConfigError

_TAIL_LINES = 30


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


@click.command("submit")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Run folder on a filesystem all nodes share (default: runs/<time>-<name>).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the sbatch script; submit and write nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Block until the job ends; exit non-zero unless it completed.")
@click.option("--no-memory-check", is_flag=True, help="Do not refuse a layout that does not fit GPU memory.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Sweep a config field (repeatable: the cartesian product); one SLURM job array, one run folder "
                   "per point inside the run folder, one W&B group.")
@click.option("--after", metavar="JOBID", help="Start only after job JOBID completed successfully (afterok).")
@pass_config(chosen=True)
def submit(cfg, chosen, run_dir: str | None, dry_run: bool, wait_: bool, no_memory_check: bool, sweeps: tuple[str, ...],
           after: str | None) -> None:
    """Queue the job on SLURM: NODES x GPUS_PER_NODE tasks, one per GPU, each running hpcmega.training.job.run_rank.

    GPUs per node: --gpus-per-node, else the config / site profile, else the partition's GRES (sinfo), else 8.

    \b
    hpcmega submit --nodes 4 --tp 8 --pp 2 --model gpt-7b --partition gpu --dry-run
    hpcmega submit --site example --config launch/gpt2-124m-4node.toml --time 02:00:00 --wait
    hpcmega submit --config launch/gpt2-124m-4node.toml --sweep train.lr=3e-4,6e-4 --sweep parallel.tp=4,8
    """
    from hpcmega.runs.files import RunFolder

    if after is not None and not re.fullmatch(r"\d+(_\d+)?", after):
        raise ConfigError(f"--after {after!r}: give a SLURM job id such as 1234 (or 1234_0 for an array task)")
    folder = RunFolder.decide(run_dir, cfg)
    if sweeps:
        queue_sweep(cfg, folder, sweeps, dry_run, wait_, no_memory_check, after)
    else:
        queue(folder.bind(cfg), dry_run, wait_, no_memory_check, after, chosen)


def queue(cfg, dry_run: bool, wait_: bool, no_memory_check: bool = False,
          after: str | None = None, chosen: list | None = None) -> None:
    """Validate, then show (--dry-run) or queue the job for the run folder ``cfg`` is bound to (RunFolder.bind;
    shared by `submit` and `resume`); ``chosen``: the values resolved by rule, shown in the dry run's plan."""
    from hpcmega.cluster import slurm
    from hpcmega.commands.plan import build_plan, config_summary, memory_check, print_estimate, print_table
    from hpcmega.runs import lock as run_lock
    from hpcmega.runs.files import RunFolder
    from hpcmega.training.job import run_rank

    path = RunFolder.of(cfg).path
    layout, warnings = build_plan(cfg)  # validation (incl. every sbatch value) + layout: exit 2 before writing
    est, notes = memory_check(cfg, no_memory_check)  # and a layout that cannot fit its GPUs
    check_before_queueing(cfg, dry_run)

    if dry_run:
        script = slurm.sbatch_script(cfg, slurm.submission_folder(path), after=after)  # refuses a bad folder
        print_table(layout, config_summary(cfg, "block", chosen), warnings)
        print_estimate(est, notes)
        click.echo(f"\nrun folder (not created): {path}")
        click.echo("sbatch script (dry run, nothing submitted):\n")
        click.echo(script)
        return

    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    for note in notes:
        click.echo(note, err=True)
    try:
        job = slurm.submit(run_rank, cfg, after)
    except slurm.SubmitError as e:  # no sbatch/srun here, or sbatch refused the job (exit 1)
        raise click.ClickException(str(e)) from None
    run_lock.acquire(path, job_id=job.job_id)  # the job's attempts keep it (same id); leaving the queue frees it
    c = cfg.cluster
    kind = "CPU task(s)" if c.cpu else "GPU task(s)"
    click.echo(f"submitted job {job.job_id}: {c.nodes} node(s) x {c.gpus_per_node} {kind}"
               + (f", partition {c.partition}" if c.partition else ""))
    click.echo(f"run folder: {path}")
    click.echo(f"follow:     hpcmega logs -f {path}\n"
               f"            hpcmega status {path}\n"
               f"            squeue -j {job.job_id}\n"
               f"            tail -f {job.log(0, 'out')}\n"
               f"            sacct -j {job.job_id}")
    if not wait_:
        return
    sys.exit(_wait(job))


def check_before_queueing(cfg, dry_run: bool) -> None:
    """What a SLURM submission checks for each run folder it queues (one job or one sweep point; ``cfg`` is bound
    to it), before anything is written: the pre-flight checks (a folder the filesystem can hold, data, resume
    target, storage, credentials, a writable checkpoint location; no probe write in a dry run), and no other job
    holds the folder. That the folder may appear in #SBATCH lines is checked once, where the script is rendered
    (hpcmega.cluster.slurm)."""
    from hpcmega.cluster.preflight import preflight
    from hpcmega.runs import lock as run_lock
    from hpcmega.runs.files import RunFolder

    path = RunFolder.of(cfg).path
    preflight(cfg, path, probe=not dry_run)
    run_lock.check_free(path)


def _sweep_points(cfg, folder, sweeps: tuple[str, ...], no_memory_check: bool, dry_run: bool):
    """-> [(name, point, cfg, layout, warnings, notes)], every point validated (exit 2 naming the point) and bound
    to its own run folder inside ``folder``."""
    from hpcmega.commands.plan import build_plan, memory_check
    from hpcmega.runs.sweep import apply_point, parse_sweeps, point_name, points

    out = []
    for i, point in enumerate(points(parse_sweeps(sweeps))):
        name = point_name(i, point)
        p_cfg = folder.point(name).bind(apply_point(cfg, point))
        p_cfg.logging.group = cfg.logging.group or folder.name
        p_cfg.logging.run_name = p_cfg.logging.run_name and f"{p_cfg.logging.run_name}-{name}"
        try:
            layout, warnings = build_plan(p_cfg)
            est, notes = memory_check(p_cfg, no_memory_check)
            check_before_queueing(p_cfg, dry_run)  # the checks and the lock of a single submit
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        out.append((name, point, p_cfg, layout, warnings, notes))
    return out


def queue_sweep(cfg, folder, sweeps: tuple[str, ...], dry_run: bool, wait_: bool, no_memory_check: bool,
                after: str | None) -> None:
    """All points as one SLURM job array (submitit's batch) in run folder ``folder`` (a RunFolder), one folder per
    point inside it: every point must give the same sbatch options."""
    from hpcmega.cluster import slurm
    from hpcmega.runs import lock as run_lock
    from hpcmega.training.job import run_rank

    path = folder.path
    pts = _sweep_points(cfg, folder, sweeps, no_memory_check, dry_run)
    first = slurm.array_parameters(pts[0][2], path, after)
    for name, _, p_cfg, *_ in pts[1:]:
        other = slurm.array_parameters(p_cfg, path, after)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise ConfigError(f"sweep point {name} changes the job's shape ({', '.join(diff)}); one job array "
                              "has one shape: sweep cluster.* fields with separate submits")
    script = slurm.sbatch_script(pts[0][2], slurm.submission_folder(path), count=len(pts), after=after) \
        if dry_run else None
    click.echo(f"sweep: {len(pts)} point(s) in {path}, W&B group {pts[0][2].logging.group}")
    for name, point, p_cfg, layout, *_ in pts:
        click.echo(f"  {name:<28} tp={layout.tp} pp={layout.pp} dp={layout.dp}  "
                   + " ".join(f"{k}={v}" for k, v in point.items()))
    for note in dict.fromkeys(n for p in pts for n in p[4] + p[5]):  # each warning once
        click.echo(f"warning: {note}" if any(note in p[4] for p in pts) else note, err=True)
    if dry_run:  # the script was rendered (and the folder checked) before anything was printed
        click.echo("sbatch script (dry run, nothing submitted):\n")
        click.echo(script)
        return
    try:
        jobs = slurm.submit_array(run_rank, [p[2] for p in pts], path, after)
    except slurm.SubmitError as e:
        raise click.ClickException(str(e)) from None
    array_id = jobs[0].job_id.split("_")[0]
    click.echo(f"submitted job array {array_id}: {len(jobs)} task(s) of {cfg.cluster.nodes} node(s) x "
               f"{cfg.cluster.gpus_per_node}")
    for job, (name, *_) in zip(jobs, pts):
        run_lock.acquire(path / name, job_id=job.job_id)  # each array task holds its point's folder, as one job
        click.echo(f"  {job.job_id:<10} {path / name}")
    click.echo(f"follow:     hpcmega ls {path}")
    if wait_:
        states = [(job.job_id, slurm.wait_for_job(job.job_id)) for job in jobs]
        for job_id, state in states:
            click.echo(f"job {job_id} finished: {state}")
        sys.exit(0 if all(state == "COMPLETED" for _, state in states) else 1)


def _wait(job) -> int:
    from hpcmega.cluster import slurm

    started = time.monotonic()
    follow = slurm.LogFollower(job.log(0, "out"), lambda text: (click.echo(text, nl=False), sys.stdout.flush()))
    try:
        state = slurm.wait_for_job(
            job.job_id,
            on_change=lambda s: click.echo(f"job {job.job_id}: {s} ({time.monotonic() - started:.0f}s)"),
            on_poll=follow,
        )
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; job {job.job_id} keeps running (scancel {job.job_id} to stop it)", err=True)
        return 130
    follow()
    result = job.result(0)
    if state == "UNKNOWN" and result is not None:  # no accounting: the tasks' own result files decide
        state = "COMPLETED" if result[0] == "success" else "FAILED"
    exit_code = slurm.job_exit_code(job.job_id)
    click.echo(f"job {job.job_id} finished: {state}" + (f" (exit code {exit_code})" if exit_code else ""))
    if state == "COMPLETED":
        train = result[1].get("train") if result and result[0] == "success" and isinstance(result[1], dict) else None
        if isinstance(train, dict) and train.get("losses"):
            click.echo(f"trained to step {train.get('final_step')}, final loss {train['losses'][-1]:.4f}")
        return 0
    err = _tail(job.log(0, "err"))
    if err:
        click.echo(f"--- last lines of rank 0's log ({job.log(0, 'err')}) ---", err=True)
        click.echo(err, nl=False, err=True)
    else:
        click.echo(f"rank 0 wrote no error log ({job.log(0, 'err')}); see sacct -j {job.job_id}", err=True)
    return 1


def register(main: click.Group) -> None:
    main.add_command(submit)

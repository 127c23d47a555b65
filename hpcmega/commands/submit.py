"""`hpcmega submit`: validate, then queue the job on SLURM through submitit (or show the sbatch script)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from hpcmega.commands.options import pass_config

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
@pass_config
def submit(cfg, run_dir: str | None, dry_run: bool, wait_: bool, no_memory_check: bool) -> None:
    """Queue the job on SLURM: NODES x GPUS_PER_NODE tasks, one per GPU, each running hpcmega.job.run_rank.

    \b
    hpcmega submit --nodes 4 --gpus-per-node 8 --tp 8 --pp 2 --model gpt-7b --partition gpu --dry-run
    hpcmega submit --site example --config launch/gpt2-124m-4node.toml --time 02:00:00 --wait
    """
    from hpcmega.launcher import default_run_dir

    path = Path(run_dir).absolute() if run_dir else default_run_dir(cfg).absolute()
    queue(cfg, path, dry_run, wait_, no_memory_check)


def queue(cfg, path: Path, dry_run: bool, wait_: bool, no_memory_check: bool = False) -> None:
    """Validate, then show (--dry-run) or queue the job for run folder ``path`` (shared by `submit` and `resume`)."""
    from hpcmega import slurm
    from hpcmega.commands.plan import _print_table, build_plan, config_summary, memory_check, print_estimate
    from hpcmega.config import ConfigError
    from hpcmega.reliability.preflight import preflight
    from hpcmega.reliability.sbatch_options import check_run_folder

    layout, warnings = build_plan(cfg)  # validation (incl. every sbatch value) + layout: exit 2 before writing
    est, notes = memory_check(cfg, no_memory_check)  # and a layout that cannot fit its GPUs
    try:
        check_run_folder(str(path))
        preflight(cfg, path, probe=not dry_run)  # data, resume target, storage, credentials, writable location
    except ConfigError as e:
        raise click.UsageError(str(e)) from None

    if dry_run:
        _print_table(layout, config_summary(cfg, "block"), warnings)
        print_estimate(est, notes)
        click.echo(f"\nrun folder (not created): {path}")
        click.echo("sbatch script (dry run, nothing submitted):\n")
        click.echo(slurm.sbatch_script(cfg, slurm.submission_folder(path)))
        return

    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    for note in notes:
        click.echo(note, err=True)
    try:
        job = slurm.submit(cfg, path)
    except (ConfigError, slurm.SubmitError) as e:  # no sbatch/srun here, or sbatch refused the job (exit 1)
        raise click.ClickException(str(e)) from None
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


def _wait(job) -> int:
    from hpcmega import slurm

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

"""`hpcmega run --nproc N`: the same job as `hpcmega submit`, as N local processes (GPUs, or CPU ranks with gloo)."""
from __future__ import annotations

import sys

import click

from hpcmega.commands.options import pass_config
from hpcmega.config import MAX_GPUS_PER_NODE
from hpcmega.errors import ConfigError


def _cuda_devices() -> int:
    import torch  # only here: `hpcmega --help` must stay light

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@click.command("run")
@click.option("--nproc", type=click.IntRange(1, MAX_GPUS_PER_NODE), required=True,
              help="Ranks to start on this machine.")
@click.option("--cpu", "force_cpu", is_flag=True, help="Use CPU ranks with gloo even if GPUs are present.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run folder (default: runs/<time>-<name>).")
@pass_config(with_cluster=False)
def run(cfg, nproc: int, force_cpu: bool, run_dir: str | None) -> None:
    """Run the job on this machine with NPROC ranks (one per GPU; CPU ranks without GPUs).

    \b
    hpcmega run --nproc 4 --tp 2 --pp 2 --steps 20
    hpcmega run --nproc 2 --config launch/shakespeare-tiny.toml
    """
    from hpcmega.cluster.launcher import local_config
    from hpcmega.commands.plan import build_plan
    from hpcmega.runs.files import RunFolder

    gpus = 0 if (force_cpu or cfg.cluster.cpu) else _cuda_devices()
    if gpus and nproc > gpus:
        raise ConfigError(f"--nproc {nproc} but this machine has {gpus} GPU(s); use --nproc {gpus} or --cpu")
    cfg = local_config(cfg, nproc, cpu=gpus == 0)
    _, warnings = build_plan(cfg)  # validation + layout: exit 2 before anything is written
    for w in warnings:
        click.echo(f"warning: {w}", err=True)

    folder = RunFolder.decide(run_dir, cfg)
    start_local(folder.bind(cfg), nproc, folder)


def start_local(cfg, nproc: int, folder, dry_run: bool = False) -> None:
    """The local launch `run` and `resume` share, for ``cfg`` bound to ``folder`` (RunFolder.bind): the pre-flight
    checks and the run-folder lock (exit 2 before anything is written), then the ranks; exits with the launcher's
    status. ``dry_run`` checks and starts nothing."""
    from hpcmega.cluster.launcher import launch_local
    from hpcmega.cluster.preflight import preflight
    from hpcmega.errors import EXIT_UNFINISHED
    from hpcmega.runs import lock as run_lock

    path = folder.given  # as the user wrote it, in messages
    preflight(cfg, folder.path, probe=not dry_run)  # data, resume target, storage, credentials, a writable location
    if dry_run:
        run_lock.check_free(folder.path)
        return
    claim = run_lock.acquire(folder.path)  # one job per run folder
    device = f"{nproc} CPU rank(s) (gloo)" if cfg.cluster.cpu else f"{nproc} GPU(s) (nccl)"
    click.echo(f"run folder: {path}\nstarting {device}; rank 0 output follows, other ranks in {path / 'logs'}")
    sys.stdout.flush()
    try:
        status = launch_local(cfg, nproc)
    finally:
        run_lock.release(folder.path, claim)
    try:
        if status == 0:
            click.echo(f"done. run folder: {path}")
        elif status == EXIT_UNFINISHED:
            click.echo(f"stopped before the last step. run folder: {path}", err=True)
        else:
            click.echo(f"failed. run folder: {path} (logs in {path / 'logs'})", err=True)
    except OSError:  # the console went away (`| head`); the run folder has everything
        pass
    sys.exit(status)


def register(main: click.Group) -> None:
    main.add_command(run)

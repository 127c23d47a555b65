"""`hpcmega resume RUN`: start a run again from its saved config and its latest checkpoint, on the same or
a different layout (DCP reshards the checkpoint on load), as a new SLURM job or a new local launch."""
from __future__ import annotations

from typing import Any

import click

from hpcmega.commands.options import config_options, flag_layer, resolve
from hpcmega.config import MAX_GPUS_PER_NODE
from hpcmega.errors import ConfigError


def _layout_text(cfg) -> str:
    return (f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.dp} on {cfg.cluster.nodes} node(s) x "
            f"{cfg.cluster.gpus_per_node}" + (" (CPU)" if cfg.cluster.cpu else ""))


@click.command("resume")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--nproc", type=click.IntRange(1, MAX_GPUS_PER_NODE), help="Local runs: ranks on this machine (default: as before).")
@click.option("--dry-run", is_flag=True, help="Show the old and new layout and the sbatch script; start nothing.")
@click.option("--wait", "wait_", is_flag=True, help="SLURM runs: block until the job ends.")
@click.option("--no-memory-check", is_flag=True, help="Do not refuse a layout that does not fit GPU memory.")
@config_options(with_cluster=True)
def resume(run: str, nproc: int | None, dry_run: bool, wait_: bool, no_memory_check: bool, site: str | None,
           config_paths: tuple[str, ...], set_items: tuple[str, ...], **kwargs: Any) -> None:
    """Resume RUN from its last checkpoint; flags change the layout or the job (--nodes, --tp, --pp, --time, ...).

    \b
    hpcmega resume runs/my-run                       # same layout, new job
    hpcmega resume runs/my-run --tp 1 --time 02:00:00 # another layout: the checkpoint is resharded on load
    """
    from hpcmega.checkpoint.store import latest_checkpoint, list_checkpoints
    from hpcmega.commands.runs import run_folder_arg
    from hpcmega.cluster.jobs import ACTIVE, run_status

    folder = run_folder_arg(run)
    s = run_status(folder)
    if s.job is not None and s.state in ACTIVE:
        raise ConfigError(f"job {s.job.job_id} of {folder.name} is still {s.state}; stop it first with "
                          f"`hpcmega cancel {folder.path}`")
    old = resolve(None, (), {}, base=(folder / "config.toml",)).config
    flags = {"checkpoint.resume": "auto", **flag_layer(kwargs)}
    cfg = folder.bind(resolve(site, config_paths, flags, set_items, base=(folder / "config.toml",)).config)
    local = s.job is not None and s.job.kind == "local"
    if local:
        from hpcmega.cluster.launcher import local_config

        cfg = local_config(cfg, nproc or old.world_size, cpu=old.cluster.cpu)
    latest = latest_checkpoint(list_checkpoints(folder.checkpoint_url(cfg))) \
        if cfg.checkpoint.resume == "auto" else None
    click.echo(f"layout: {_layout_text(old)}  ->  {_layout_text(cfg)}")
    click.echo(f"resume from: {latest.url} (step {latest.step}, written with {latest.layout})" if latest
               else f"resume from: {cfg.checkpoint.resume}" if cfg.checkpoint.resume not in ("auto", "none")
               else "resume from: no complete checkpoint yet, training starts at step 0")
    if local:
        _resume_local(cfg, folder, dry_run)
        return
    from hpcmega.commands.submit import queue

    queue(cfg, dry_run, wait_, no_memory_check)


def _resume_local(cfg, folder, dry_run: bool) -> None:
    """A local run resumes as `hpcmega run` starts: validation, the pre-flight checks (a checkpoint of another
    model is refused, also in a dry run) and the run-folder lock, then the ranks."""
    from hpcmega.commands.plan import build_plan
    from hpcmega.commands.run import start_local

    _, warnings = build_plan(cfg)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    start_local(cfg, cfg.cluster.gpus_per_node, folder, dry_run)


def register(main: click.Group) -> None:
    main.add_command(resume)

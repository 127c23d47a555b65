"""`hpcmega sync RUN_DIR`: upload a run's offline W&B attempts, oldest first (they share one run id)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click


@click.command("sync")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def sync(run_dir: str) -> None:
    """Upload the offline W&B runs of RUN_DIR (needs WANDB_API_KEY in the environment and internet)."""
    attempts = sorted(Path(run_dir).glob("wandb/offline-run-*"))
    if not attempts:
        raise click.UsageError(f"{run_dir} has no offline W&B runs (wandb/offline-run-*); was it run with --wandb offline?")
    for folder in attempts:
        click.echo(f"syncing {folder}")
        status = subprocess.run([sys.executable, "-m", "wandb", "sync", str(folder)]).returncode
        if status != 0:
            raise SystemExit(status)


def register(main: click.Group) -> None:
    main.add_command(sync)

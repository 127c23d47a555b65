"""`hpcmega sync RUN_DIR`: upload a run's offline W&B attempts, oldest first (they share one run id; an attempt
that rewound the run carries its branch point and is uploaded after the one it rewinds)."""
from __future__ import annotations

import netrc
import os
import subprocess
import sys
from pathlib import Path

import click

from hpcmega.errors import ConfigError


def has_api_key() -> bool:
    """WANDB_API_KEY in the environment, or a `wandb login` entry in ~/.netrc (the key itself is never read out)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return base in hosts


@click.command("sync")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def sync(run_dir: str) -> None:
    """Upload the offline W&B runs of RUN_DIR (needs WANDB_API_KEY in the environment or `wandb login`, and
    internet)."""
    attempts = sorted(Path(run_dir).glob("wandb/offline-run-*"))
    if not attempts:
        raise ConfigError(f"{run_dir} has no offline W&B runs (wandb/offline-run-*); was it run with --wandb offline?")
    if not has_api_key():
        raise ConfigError("no W&B API key: export WANDB_API_KEY=... (from https://wandb.ai/authorize) or run "
                          "`wandb login` first; nothing was uploaded")
    for folder in attempts:
        click.echo(f"syncing {folder}")
        status = subprocess.run([sys.executable, "-m", "wandb", "sync", str(folder)]).returncode
        if status != 0:
            raise SystemExit(status)


def register(main: click.Group) -> None:
    main.add_command(sync)

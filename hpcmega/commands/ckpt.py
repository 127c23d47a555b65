"""`hpcmega ckpt ls URL` and `hpcmega ckpt verify CKPT`: checkpoints on any fsspec URL, without loading torch."""
from __future__ import annotations

import json
import sys
import time

import click

from hpcmega.errors import ConfigError


@click.group("ckpt")
def ckpt_group() -> None:
    """Inspect and export checkpoints."""


def _storage_error(url: str, e: Exception) -> click.ClickException:
    """Storage that cannot be read (no credentials, unknown protocol, permissions): one line, exit 1."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return click.ClickException(f"cannot read {url}: {type(e).__name__}: {first}; check the URL and, for s3://, "
                                "the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")


@ckpt_group.command("ls")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(url: str, as_json: bool) -> None:
    """List step, layout, size and state (complete, INCOMPLETE, DAMAGED) of the checkpoints under URL (a run
    folder works too: its checkpoints are listed); the latest -- the one `resume` continues from -- is marked."""
    from hpcmega.checkpoint.store import latest_checkpoint, list_checkpoints
    from hpcmega.runs.files import checkpoints_of

    try:
        url = checkpoints_of(url)
        infos = list_checkpoints(url)
    except Exception as e:  # storage errors are many types across fsspec backends
        raise _storage_error(url, e) from None
    if not infos:
        raise ConfigError(f"no checkpoints (step-XXXXXXXX folders) under {url}; check the URL")
    latest = latest_checkpoint(infos)
    if as_json:
        click.echo(json.dumps([{**{k: v for k, v in i.to_json().items() if k != "meta"}, "latest": i is latest}
                               for i in infos], indent=2))
        return
    click.echo(f"{'step':>8}  {'layout':<22}{'size':>10}  {'state':<10}  {'written':<19}  folder")
    for i in infos:
        stamp = i.meta.get("time")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if isinstance(stamp, (int, float)) else "-"
        click.echo(f"{i.step:>8}  {i.layout:<22}{i.size_bytes / 1e6:>8.1f}MB  {i.state:<10}  {when:<19}  {i.name}"
                   + (f"  ({i.damage})" if i.damage else "") + ("  <- latest" if i is latest else ""))


@ckpt_group.command("verify")
@click.argument("checkpoint")
@click.option("--no-checksums", is_flag=True, help="Check sizes only (fast on huge checkpoints).")
def verify(checkpoint: str, no_checksums: bool) -> None:
    """Check one checkpoint folder against its manifest (every file's size and SHA-256); exit 1 if damaged."""
    from hpcmega.checkpoint.store import verify_checkpoint

    try:
        problems = verify_checkpoint(checkpoint, checksums=not no_checksums)
    except Exception as e:
        raise _storage_error(checkpoint, e) from None
    if problems:
        click.echo(f"DAMAGED {checkpoint}: {'; '.join(problems)}", err=True)
        sys.exit(1)
    click.echo(f"OK {checkpoint}: every file matches its manifest" + (" (sizes only)" if no_checksums else ""))


def register(main: click.Group) -> None:
    main.add_command(ckpt_group)

"""`hpcmega ckpt ls URL`: the checkpoints under a URL (any fsspec URL), without loading torch."""
from __future__ import annotations

import json
import time

import click


@click.group("ckpt")
def ckpt_group() -> None:
    """Inspect and export checkpoints."""


@ckpt_group.command("ls")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(url: str, as_json: bool) -> None:
    """List step, layout, size and completeness of the checkpoints under URL (e.g. RUN_DIR/checkpoints)."""
    from hpcmega.checkpoint import list_checkpoints

    infos = list_checkpoints(url)
    if not infos:
        raise click.UsageError(f"no checkpoints (step-XXXXXXXX folders) under {url}; check the URL")
    if as_json:
        click.echo(json.dumps([{k: v for k, v in i.to_json().items() if k != "meta"} for i in infos], indent=2))
        return
    click.echo(f"{'step':>8}  {'layout':<22}{'size':>10}  {'state':<10}  written")
    for i in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.meta["time"])) if "time" in i.meta else "-"
        state = "complete" if i.complete else "INCOMPLETE"
        click.echo(f"{i.step:>8}  {i.layout:<22}{i.size_bytes / 1e6:>8.1f}MB  {state:<10}  {when}")


def register(main: click.Group) -> None:
    main.add_command(ckpt_group)

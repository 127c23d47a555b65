"""`hpcmega config show`: print the resolved configuration."""
from __future__ import annotations

import click

from hpcmega.commands.options import CLUSTER_FLAGS, add_options, pass_config


@click.group("config")
def config_group() -> None:
    """Inspect configurations."""


@config_group.command("show")
@add_options(CLUSTER_FLAGS)
@pass_config
def show(cfg) -> None:
    """Print the resolved config (defaults <- preset <- TOML <- flags) as TOML."""
    click.echo(cfg.to_toml(), nl=False)


def register(main: click.Group) -> None:
    main.add_command(config_group)

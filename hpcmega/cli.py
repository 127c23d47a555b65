"""The `hpcmega` command line. Importing this module must not import torch, wandb or submitit:
`hpcmega --help` runs on login nodes and in every job script, so heavy imports live inside commands."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from hpcmega import __version__
from hpcmega.errors import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="hpcmega")
def main() -> None:
    """Train a 3D-parallel GPT locally or on a SLURM cluster.

    \b
    hpcmega plan   --nodes 4 --gpus-per-node 8 --tp 8 --pp 2 --model gpt-7b   # check a layout
    hpcmega run    --nproc 4 --tp 2 --pp 2                                    # the job on this machine
    hpcmega submit --nodes 4 --tp 8 --pp 2 --model gpt-7b --partition gpu     # the job on SLURM
    """


def _register() -> None:
    # Each module adds its commands to `main`; they import only click and pure modules at import time.
    import importlib
    import pkgutil

    import hpcmega.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name != "options":
            module = importlib.import_module(f"hpcmega.commands.{info.name}")
            register = getattr(module, "register", None)
            if register is not None:
                register(main)


class BadInput(click.ClickException):
    """Bad input refused before anything is queued or written: ``Error: <what is wrong; the fix>``, one line on
    stderr, exit status 2 (click's UsageError would print the usage and a --help hint above it)."""

    exit_code = 2


def _config_errors_exit_2(callback: Callable[..., Any]) -> Callable[..., Any]:
    """The one place a ConfigError becomes a CLI error (:class:`BadInput`)."""
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ConfigError as e:
            raise BadInput(str(e)) from None

    return wrapper


def _wrap_commands(group: click.Group) -> None:
    for command in group.commands.values():
        if command.callback is not None:
            command.callback = _config_errors_exit_2(command.callback)
        if isinstance(command, click.Group):
            _wrap_commands(command)


_register()
_wrap_commands(main)

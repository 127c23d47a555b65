"""The `hpcmega` command line. Importing this module must not import torch, wandb or submitit:
`hpcmega --help` runs on login nodes and in every job script, so heavy imports live inside commands."""
from __future__ import annotations

import click

from hpcmega import __version__


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


_register()

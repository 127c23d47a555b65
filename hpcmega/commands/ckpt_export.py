"""`hpcmega ckpt export RUN_OR_CKPT --to hf OUT/`: a checkpoint of any layout as a Hugging Face folder."""
from __future__ import annotations

import json
from pathlib import Path

import click

from hpcmega.commands.ckpt import ckpt_group
from hpcmega.commands.options import field_option
from hpcmega.errors import ConfigError

FORMATS = ("hf",)


@ckpt_group.command("export")
@click.argument("target", metavar="RUN_OR_CKPT")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--to", "fmt", type=click.Choice(FORMATS), required=True,
              help="hf: a Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM).")
@click.option("--step", type=click.IntRange(min=0),
              help="Checkpoint step (default: the latest checkpoint, as `ckpt ls` marks it).")
@field_option("checkpoint.trust", "trust")
@click.option("--force", is_flag=True, help="Write into OUT even if it is not empty.")
def export(target: str, out: str, fmt: str, step: int | None, trust: bool | None, force: bool) -> None:
    """Export RUN_OR_CKPT (a run folder, RUN/checkpoints or a step folder, written with any layout) to OUT.

    \b
    hpcmega ckpt export runs/shakespeare-tiny --to hf exported/
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('exported')"
    """
    from hpcmega.checkpoint.locate import find_checkpoint
    from hpcmega.cluster.preflight import storage_filesystem

    if Path(out).is_dir() and any(Path(out).iterdir()) and not force:
        raise ConfigError(f"{out} is not empty; pick a new folder or pass --force to overwrite files in it")
    storage_filesystem(target, "RUN_OR_CKPT")  # unknown protocol, missing package or s3 credentials: one line
    info = find_checkpoint(target, step, bool(trust))
    from hpcmega.data.index import data_tokenizer
    from hpcmega.inference.load import load_model  # torch: only once the checkpoint is found
    from hpcmega.models.hf import export_hf

    model, cfg = load_model(info)
    notes = export_hf(model, out, data_tokenizer(cfg.train.data))  # the tokenizer the run's data was prepared with
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"exported step {info.step} ({info.layout}) of {info.url} -> {out} (Hugging Face "
               f"{json.loads((Path(out) / 'config.json').read_text())['architectures'][0]})")


def register(main: click.Group) -> None:
    """`export` is a subcommand of `ckpt`, added to that group when this module is imported."""

"""`hpcmega ckpt import --from hf DIR --out URL`: a Hugging Face model folder as an hpcmega checkpoint that any layout
starts from."""
from __future__ import annotations

import click

from hpcmega.commands.ckpt import ckpt_group

FORMATS = ("hf",)


@ckpt_group.command("import")
@click.option("--from", "fmt", type=click.Choice(FORMATS), required=True,
              help="hf: a Hugging Face folder (config.json + *.safetensors, sharded or not).")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", required=True, help="Checkpoint location to create (a path or fsspec URL; must not exist).")
def import_(fmt: str, folder: str, out: str) -> None:
    """Import FOLDER (GPT2LMHeadModel, or LlamaForCausalLM-style: Llama, Qwen2, Mistral) into a new checkpoint
    location OUT, one tensor at a time; the model section of its config comes from FOLDER/config.json.

    \b
    hpcmega ckpt import --from hf ./Llama-3.2-1B --out ckpts/llama-1b
    hpcmega run --init-from ckpts/llama-1b --trust-checkpoint --tp 2 ...
    """
    from hpcmega.models.hf import Import

    job = Import(folder, out)  # every check; a ConfigError is one line, exit 2 (hpcmega.cli)
    info = job.write()
    m = job.cfg.model
    click.echo(f"imported {job.folder.architecture} ({m.n_layers} layers, d={m.d_model}, vocab {m.vocab_size}, "
               f"{len(job.params)} tensors) from {folder} -> {info.url}")


def register(main: click.Group) -> None:
    """`import` is a subcommand of `ckpt`, added to that group when this module is imported."""

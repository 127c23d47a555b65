"""`hpcmega data prepare`: tokenize text into shards the training loader reads (see hpcmega.data.prepare)."""
from __future__ import annotations

import click


@click.group("data")
def data_group() -> None:
    """Prepare training data."""


@data_group.command("prepare")
@click.option("--source", required=True, help="'shakespeare' (bundled corpus), a .txt file, a folder or a glob.")
@click.option("--out", required=True, help="Output fsspec URL (path, file://, memory://, s3://).")
@click.option("--shard-tokens", type=click.IntRange(min=1024), default=10_000_000, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.01, show_default=True,
              help="Share of the tokens (the end of the stream) held out as the validation split.")
@click.option("--force", is_flag=True, help="Overwrite a prepared dataset at --out.")
def prepare_cmd(source: str, out: str, shard_tokens: int, val_fraction: float, force: bool) -> None:
    """Tokenize SOURCE with GPT-2's BPE (offline) into uint16 shards + index.json at OUT."""
    from hpcmega.errors import ConfigError
    from hpcmega.data.prepare import prepare
    from hpcmega.cluster.preflight import storage_filesystem

    try:
        storage_filesystem(out, "--out")  # unknown protocol, missing s3 credentials: exit 2 before any work
        info = prepare(source, out, shard_tokens=shard_tokens, force=force, val_fraction=val_fraction)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except OSError as e:  # unwritable target, storage errors: one line, exit 1
        raise click.ClickException(f"cannot write the dataset to {out}: {type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0]}; choose a writable --out") from None
    click.echo(f"prepared {len(info['documents'])} documents: {info['tokens']:,} training tokens in "
               f"{len(info['shards'])} shard(s) + {info['val_tokens']:,} validation tokens at {out} "
               f"({info['seconds']:.1f}s)")


def register(main: click.Group) -> None:
    main.add_command(data_group)

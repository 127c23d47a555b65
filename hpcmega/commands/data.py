"""`hpcmega data prepare`: tokenize a corpus into shards the training loader reads (see hpcmega.data.prepare), here
with a pool of processes, or on several SLURM nodes with ``--submit``."""
from __future__ import annotations

import click

from hpcmega.commands.options import Finite, field_option
from hpcmega.data.sources import PIECE_BYTES


@click.group("data")
def data_group() -> None:
    """Prepare training data."""


def _cluster_options(fn):
    """The scheduler flags of a multi-node prepare (the same declarations as `submit`'s)."""
    for key in reversed(("cluster.nodes", "cluster.partition", "cluster.account", "cluster.qos", "cluster.time",
                         "cluster.cpus_per_task", "cluster.mem", "cluster.sbatch_extra", "cluster.setup")):
        fn = field_option(key, key.replace(".", "__"))(fn)
    fn = click.option("--config", "config_paths", multiple=True, type=click.Path(dir_okay=False),
                      help="TOML config file whose [cluster] table applies (with --submit).")(fn)
    return click.option("--site", help="Site profile slurm/sites/SITE.toml (with --submit).")(fn)


@data_group.command("prepare")
@click.option("--source", required=True,
              help="'shakespeare' (bundled), a .txt/.jsonl(.gz/.zst)/.parquet file, a folder, a glob, or an fsspec URL.")
@click.option("--out", required=True, help="Output fsspec URL (path, file://, memory://, s3://).")
@click.option("--tokenizer", default="gpt2", show_default=True,
              help="'gpt2', a Hugging Face tokenizer.json, or a model folder holding one.")
@click.option("--text-field", default="text", show_default=True, help="The text's key (jsonl) or column (parquet).")
@click.option("--workers", type=click.IntRange(0, 1024), default=0, help="Tokenizer processes [default: the usable cores, one per 8 MB of input at most].")
@click.option("--shard-tokens", type=click.IntRange(1024, 2**40), default=10_000_000, show_default=True)
@click.option("--val-fraction", type=Finite(0, 1, max_open=True), default=0.01, show_default=True,
              help="Share of the tokens (the end of the stream) held out as the validation split.")
@click.option("--piece-bytes", type=click.IntRange(4096, 2**30), default=PIECE_BYTES, show_default=True,
              help="Input bytes per unit of work (restart granularity, load balance); never changes the output.")
@click.option("--strict", is_flag=True, help="Fail on the first bad row instead of skipping and counting it.")
@click.option("--force", is_flag=True, help="Overwrite a prepared dataset at --out.")
@click.option("--submit", "submit_", is_flag=True, help="Tokenize on --nodes SLURM nodes (one task each, its cores as "
                                                         "workers), then one final job writes the index.")
@click.option("--wait", "wait_", is_flag=True, help="With --submit: block until the final job ends.")
@_cluster_options
def prepare_cmd(source: str, out: str, tokenizer: str, text_field: str, workers: int, shard_tokens: int,
                val_fraction: float, piece_bytes: int, strict: bool, force: bool, submit_: bool, wait_: bool, site: str | None,
                config_paths: tuple[str, ...], **cluster) -> None:
    """Tokenize SOURCE into token shards + index.json at OUT (uint16 ids, uint32 above 65,536), restartable:
    run the same command again after an interruption and it continues.

    \b
    hpcmega data prepare --source shakespeare --out data/shakespeare
    hpcmega data prepare --source 'corpus/*.jsonl.zst' --tokenizer hf-model/ --out /shared/data/corpus
    hpcmega data prepare --source /shared/fineweb --out /shared/data/fineweb --submit --nodes 4 --cpus-per-task 32
    """
    from hpcmega.cluster.preflight import storage_filesystem
    from hpcmega.data.prepare import prepare

    args = dict(source=source, out=out, tokenizer=tokenizer, text_field=text_field, shard_tokens=shard_tokens,
                val_fraction=val_fraction, strict=strict, force=force,
                piece_bytes=piece_bytes)
    try:
        storage_filesystem(out, "--out")  # unknown protocol, missing s3 credentials: exit 2 before any work
        if submit_:
            submit_prepare(args, cluster_config(site, config_paths, cluster), wait_)
            return
        info = prepare(**args, workers=workers, progress=True)
    except OSError as e:  # unwritable target, storage errors: one line, exit 1
        raise click.ClickException(f"cannot write the dataset to {out}: {type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0]}; choose a writable --out") from None
    click.echo(summary_line(info, out))


def cluster_config(site: str | None, config_paths: tuple[str, ...], flags: dict):
    """The [cluster] settings of a multi-node prepare (site profile, files, flags): one CPU task per node."""
    from hpcmega.commands.options import resolve
    from hpcmega.config import FIELDS, Append

    given = {k.replace("__", "."): v for k, v in flags.items() if v is not None and v != ()}
    cfg = resolve(site, config_paths, {k: Append(v) if FIELDS[k].is_list else v for k, v in given.items()}).config
    cfg.cluster.cpu, cfg.cluster.gpus_per_node = True, 1
    cfg.cluster.job_name = cfg.cluster.job_name or "data-prepare"
    return cfg


def submit_prepare(args: dict, cfg, wait_: bool) -> None:
    """Plan on this node, then two SLURM jobs through the training jobs' submit path: NODES tasks tokenizing
    every NODES-th piece each, and, after it succeeded, one task assembling the shards and writing the index."""
    import dataclasses
    import sys
    import time
    from pathlib import Path

    import fsspec

    from hpcmega.cluster import slurm
    from hpcmega.cluster.sbatch import check_cluster_values, check_run_folder
    from hpcmega.data.index import read_index
    from hpcmega.data.prepare import JOB_FOLDER, begin, finish_entry, tokenize_entry
    from hpcmega.errors import ConfigError
    from hpcmega.runs.files import RunFolder

    out = args["out"]
    if "://" in out and not out.startswith("file://"):
        raise ConfigError(f"--submit needs --out on a filesystem every node shares (a path), not {out}")
    job_dir = Path(out.removeprefix("file://")).absolute() / JOB_FOLDER
    check_run_folder(str(job_dir))
    check_cluster_values(cfg.cluster)
    start = time.monotonic()
    plan, resumed, _ = begin(**args)
    final = dataclasses.replace(cfg, cluster=dataclasses.replace(
        cfg.cluster, nodes=1, sbatch_extra=[*cfg.cluster.sbatch_extra, "--kill-on-invalid-dep=yes"]))
    try:
        tokenize = slurm.submit(tokenize_entry, RunFolder(job_dir).bind(cfg))
        last = slurm.submit(finish_entry, RunFolder(job_dir).bind(final), after=tokenize.job_id)
    except slurm.SubmitError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"submitted job {tokenize.job_id}: {cfg.cluster.nodes} node(s) tokenize {len(plan['pieces'])} "
               f"piece(s)" + (f" ({resumed} already done)" if resumed else "") +
               f"; job {last.job_id} writes the index after it")
    click.echo(f"follow:     hpcmega status {job_dir}\n            tail -f {tokenize.log(0, 'out')}")
    if wait_:
        states = [(job.job_id, slurm.wait_for_job(job.job_id)) for job in (tokenize, last)]
        for job_id, state in states:
            click.echo(f"job {job_id} finished: {state}")
        if any(state != "COMPLETED" for _, state in states):
            sys.exit(1)
        fs, root = fsspec.core.url_to_fs(out)
        click.echo(summary_line({**read_index(fs, root, out), "seconds": time.monotonic() - start}, out))


def summary_line(info: dict, out: str) -> str:
    """The last line of a prepare: documents, tokens, shards, seconds, throughput (and what was skipped)."""
    tokens = info["tokens"] + info["val_tokens"]
    shards = len(info["shards"]) + len(info["val_shards"])
    bad = sum(info.get("bad_rows", {}).values())
    secs = info.get("seconds", 0.0)
    resumed = f", {info['resumed']} of {info['pieces']} pieces kept from an interrupted run" if info.get("resumed") \
        else ""
    skipped = f"; skipped {bad:,} bad row(s): " + ", ".join(f"{n:,} {why}" for why, n in info["bad_rows"].items()) \
        if bad else ""
    return (f"prepared {info['documents']:,} documents: {info['tokens']:,} training tokens + {info['val_tokens']:,} "
            f"validation tokens in {shards} shard(s) ({info['dtype']}) at {out} in {secs:.1f}s "
            f"({tokens / max(secs, 1e-9):,.0f} tokens/s){resumed}{skipped}")


def register(main: click.Group) -> None:
    main.add_command(data_group)

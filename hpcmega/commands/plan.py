"""`hpcmega plan`: check a configuration and show the groups it gives, before anything is queued.

The layout printed here is computed by the same code the job runs on its real placement (hpcmega.layout), so
what the plan shows is what the ranks will build. Nothing is written; bad input exits with status 2.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from hpcmega.commands.options import pass_config

# Groups listed per dimension in the table; the full lists are in --json.
_MAX_ROWS = 16


def _node_names(cfg, node_names: str | None) -> list[str]:
    from hpcmega.layout import default_node_names

    if not node_names:
        return default_node_names(cfg.cluster.nodes)
    names = [n.strip() for n in node_names.split(",") if n.strip()]
    if len(names) != cfg.cluster.nodes:
        raise click.UsageError(f"--node-names lists {len(names)} names but --nodes is {cfg.cluster.nodes}; "
                               "give exactly one name per node")
    if len(set(names)) != len(names):
        raise click.UsageError("--node-names repeats a name; give each node a distinct name")
    return names


def build_plan(cfg, placement_kind: str = "block", node_names: str | None = None) -> tuple[Any, list[str]]:
    """Validate ``cfg`` and compute its layout on a simulated placement -> (Layout, all warnings).

    Raises click.UsageError (exit 2) with the validator's one-line message on bad input.
    """
    from hpcmega.config import ConfigError
    from hpcmega.layout import block_placement, compute_layout, cyclic_placement, domains_by_block
    from hpcmega.validate import validate

    try:
        warnings = validate(cfg)
        names = _node_names(cfg, node_names)
        place = block_placement if placement_kind == "block" else cyclic_placement
        placement = place(cfg.cluster.nodes, cfg.cluster.gpus_per_node, names)
        domains = domains_by_block(names, cfg.cluster.nvlink_domain_nodes)
        layout = compute_layout(placement, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.order, domains)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    return layout, warnings + layout.warnings


def config_summary(cfg, placement_kind: str) -> dict[str, Any]:
    """The config facts a plan reader needs next to the groups (stable keys, part of `plan --json`)."""
    return {
        "model": cfg.model.preset,
        "n_layers": cfg.model.n_layers,
        "n_heads": cfg.model.n_heads,
        "d_model": cfg.model.d_model,
        "vocab_size": cfg.model.vocab_size,
        "nodes": cfg.cluster.nodes,
        "gpus_per_node": cfg.cluster.gpus_per_node,
        "nvlink_domain_nodes": cfg.cluster.nvlink_domain_nodes,
        "distribution": placement_kind,
        "schedule": cfg.parallel.schedule,
        "stages_per_rank": cfg.stages_per_rank,
        "layers_per_stage": cfg.model.n_layers // (cfg.parallel.pp * cfg.stages_per_rank),
        "global_batch": cfg.train.global_batch,
        "micro_batch": cfg.train.micro_batch,
        "microbatches": cfg.microbatches,
        "seq_len": cfg.train.seq_len,
        "sequence_parallel": cfg.sequence_parallel,
        "recompute": cfg.parallel.recompute,
        "precision": cfg.train.precision,
    }


def _print_table(layout, summary: dict[str, Any], warnings: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = sys.stdout
    console = Console(file=out, width=None if out.isatty() else 120, highlight=False)

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    s = summary
    nodes = f"{s['nodes']} node" + ("s" if s["nodes"] != 1 else "")
    head.add_row("world size", f"{layout.world_size} = {nodes} x {s['gpus_per_node']} GPUs"
                 + (f" (NVLink domains of {s['nvlink_domain_nodes']} nodes)" if s["nvlink_domain_nodes"] > 1 else ""))
    head.add_row("parallel", f"tp={layout.tp}  pp={layout.pp}  dp={layout.dp}  order={layout.order}  "
                 f"distribution={s['distribution']}")
    head.add_row("model", f"{s['model']}: {s['n_layers']} layers, {s['n_heads']} heads, d_model={s['d_model']}, "
                 f"vocab={s['vocab_size']}")
    head.add_row("pipeline", f"schedule={s['schedule']}, {s['stages_per_rank']} stage(s) per rank, "
                 f"{s['layers_per_stage']} layer(s) per stage")
    head.add_row("batch", f"global_batch={s['global_batch']} = dp {layout.dp} x micro_batch {s['micro_batch']} x "
                 f"{s['microbatches']} microbatches, seq_len={s['seq_len']}")
    head.add_row("other", f"sequence_parallel={s['sequence_parallel']}, recompute={s['recompute']}, "
                 f"precision={s['precision']}")
    console.print(head)

    for dim, groups in (("TP", layout.tp_groups), ("PP", layout.pp_groups), ("DP", layout.dp_groups)):
        table = Table(title=f"{dim} groups ({len(groups)} of size {len(groups[0])})", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("ranks (by coordinate)")
        table.add_column("nodes")
        for i, group in enumerate(groups[:_MAX_ROWS]):
            table.add_row(str(i), " ".join(map(str, group)), ", ".join(layout.nodes_of(group)))
        if len(groups) > _MAX_ROWS:
            table.add_row("...", f"{len(groups) - _MAX_ROWS} more (see --json)", "")
        console.print(table)

    if warnings:
        for w in warnings:
            console.print(f"warning: {w}", markup=False, soft_wrap=True)
    else:
        console.print("checks passed, no warnings")


@click.command("plan")
@click.option("--json", "as_json", is_flag=True, help="Print the layout as JSON (the schema of layout.json).")
@click.option("--placement", "placement_kind", type=click.Choice(["block", "cyclic"]), default="block",
              show_default=True, help="SLURM task distribution to preview.")
@click.option("--node-names", help="Comma-separated node names (default node1..nodeN).")
@pass_config
def plan(cfg, as_json: bool, placement_kind: str, node_names: str | None) -> None:
    """Validate a config and show its TP/PP/DP groups and the nodes each spans.

    \b
    hpcmega plan --nodes 4 --gpus-per-node 8 --tp 8 --pp 2 --model gpt-7b
    hpcmega plan --config launch/gpt2-124m-4node.toml --json
    """
    layout, warnings = build_plan(cfg, placement_kind, node_names)
    summary = config_summary(cfg, placement_kind)
    if as_json:
        data = layout.to_json()
        data["warnings"] = warnings
        data["config"] = summary
        click.echo(json.dumps(data, indent=2))
    else:
        _print_table(layout, summary, warnings)


def register(main: click.Group) -> None:
    main.add_command(plan)

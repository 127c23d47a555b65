"""`hpcmega plan`: check a configuration and show the groups it gives, before anything is queued.

The layout printed here is computed by the same code the job runs on its real placement (hpcmega.planning.layout), so
what the plan shows is what the ranks will build. Nothing is written; bad input exits with status 2.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from hpcmega.commands.options import pass_config
from hpcmega.errors import ConfigError
from hpcmega.planning.families import kv_heads_replicated

# Groups listed per dimension in the table; the full lists are in --json.
_MAX_ROWS = 16


def _node_names(cfg, node_names: str | None) -> list[str]:
    from hpcmega.planning.layout import default_node_names

    if not node_names:
        return default_node_names(cfg.cluster.nodes)
    names = [n.strip() for n in node_names.split(",") if n.strip()]
    if len(names) != cfg.cluster.nodes:
        raise ConfigError(f"--node-names lists {len(names)} names but --nodes is {cfg.cluster.nodes}; "
                          "give exactly one name per node")
    if len(set(names)) != len(names):
        raise ConfigError("--node-names repeats a name; give each node a distinct name")
    return names


def build_plan(cfg, placement_kind: str = "block", node_names: str | None = None) -> tuple[Any, list[str]]:
    """Validate ``cfg`` and compute its layout on a simulated placement -> (Layout, all warnings).

    Raises ConfigError (exit 2, hpcmega.cli) with the validator's one-line message on bad input.
    """
    from hpcmega.planning.layout import planned_layout
    from hpcmega.planning.validate import validate

    warnings = validate(cfg)
    layout = planned_layout(cfg, _node_names(cfg, node_names), placement_kind)
    return layout, warnings + layout.warnings


def config_summary(cfg, placement_kind: str, chosen: list | None = None) -> dict[str, Any]:
    """The config facts a plan reader needs next to the groups (stable keys, part of `plan --json`); ``chosen``:
    the values resolved by rule rather than given (config.resolve_defaults), with why."""
    return {
        "model": cfg.model.preset,
        "family": cfg.model.family,
        "n_layers": cfg.model.n_layers,
        "n_heads": cfg.model.n_heads,
        "n_kv_heads": cfg.model.kv_heads,
        "kv_heads_replicated": kv_heads_replicated(cfg.model.family, cfg.model.kv_heads, cfg.parallel.tp),
        "ffn_hidden": cfg.model.ffn,
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
        "data_parallel": cfg.parallel.data_parallel,
        "chosen": [{"key": c.key, "value": c.value, "source": c.source} for c in chosen or []],
    }


def _kv_line(s: dict[str, Any], tp: int) -> str:
    """How the kv heads of grouped-query attention sit on the TP ranks (nothing for full multi-head attention)."""
    kv = s["n_kv_heads"]
    if kv == s["n_heads"]:
        return ""
    if s["kv_heads_replicated"]:
        return f", {kv} kv heads (replicated: tp={tp} > {kv}, each rank computes the one its query heads share)"
    return f", {kv} kv heads ({kv // tp} per TP rank)"


def memory_check(cfg, skip: bool):
    """The planner's memory check (hpcmega.planning.check); a refusal is a ConfigError (exit 2)."""
    from hpcmega.planning.check import memory_gate

    return memory_gate(cfg, skip)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def print_estimate(est, notes: list[str], measured: dict[str, Any] | None = None) -> None:
    """Per-stage memory (and what --measure saw), then bubble, FLOPs, step time and traffic."""
    from rich.console import Console
    from rich.table import Table

    from hpcmega.planning.estimate import GIB

    out = sys.stdout
    console = Console(file=out, width=None if out.isatty() else 120, highlight=False)
    gpu = f"{est.gpu.name}, {est.gpu_mem_gib:.1f} GiB" if est.gpu else "no GPU (CPU job)"
    table = Table(title=f"memory per GPU, GiB ({gpu})", title_justify="left")
    for col in ("stage", "params", "grads", "optimizer", "activations", "buffers", "peak"):
        table.add_column(col, justify="right")
    half = _MAX_ROWS // 2  # the first and last stages (the peak is printed below); all of them: --json
    shown = est.ranks if len(est.ranks) <= _MAX_ROWS else est.ranks[:half] + [None] + est.ranks[-half:]
    for r in shown:
        if r is None:
            table.add_row("...", f"{len(est.ranks) - 2 * half} more stages (see --json)")
            continue
        table.add_row(str(r.stage), *(f"{x / GIB:.2f}" for x in (r.params, r.grads, r.optimizer, r.activations,
                                                                 r.buffers, r.peak)))
    console.print(table)
    if measured:
        _print_measured(console, measured)
    per_layer = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in est.per_layer.items())
    console.print(f"activations per layer and microbatch: {per_layer}")
    sh = est.shape
    line = (f"bubble {100 * est.bubble:.1f}%, {est.tokens_per_step:,} tokens per step, "
            f"{est.flops_per_step:.3g} model FLOPs per step")
    if est.est_step_s:
        line += (f"; at {100 * est.mfu:.0f}% MFU on {sh.tp * sh.pp * sh.dp} x {est.gpu.name}: "
                 f"{est.est_step_s:.3g} s/step, {est.tokens_per_s:,.0f} tokens/s")
    console.print(line)
    console.print("traffic per GPU per step: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in est.comm.items()))
    verdict = "fits" if est.fits else ("does NOT fit" if est.fits is False else "not checked")
    if est.fits is not None:
        console.print(f"peak {est.peak_gib:.1f} GiB of {est.gpu_mem_gib:.1f} GiB: {verdict}")
    for note in notes:
        console.print(note, markup=False, soft_wrap=True)


def _auto(cfg, as_json: bool) -> None:
    """`plan --auto`: all fitting layouts (JSON) or the five fastest (table); exit 2 when none fits."""
    from hpcmega.planning.search import nodes_that_fit, search

    found = search(cfg)
    if not found:
        bigger = nodes_that_fit(cfg)
        hint = (f"try --nodes {bigger.cfg.cluster.nodes} ({bigger.flags()})" if bigger else
                "no layout of at most 1024 nodes fits either")
        raise ConfigError(f"no layout of {cfg.cluster.nodes} node(s) x {cfg.cluster.gpus_per_node} "
                          f"{cfg.cluster.gpu} fits {cfg.model.preset}; {hint}")
    if as_json:
        click.echo(json.dumps({"config": config_summary(cfg, "block"), "layouts": [c.to_json() for c in found]},
                              indent=2))
        return
    _print_auto(cfg, found)


def _print_auto(cfg, found) -> None:
    from rich.console import Console
    from rich.table import Table

    out = sys.stdout
    console = Console(file=out, width=None if out.isatty() else 160, highlight=False)
    c = cfg.cluster
    table = Table(title=f"{len(found)} layouts fit {cfg.model.preset} on {c.nodes} x {c.gpus_per_node} {c.gpu} "
                        f"(global_batch={cfg.train.global_batch}, seq_len={cfg.train.seq_len}, "
                        f"{cfg.train.precision}); fastest 5 at {100 * c.mfu:.0f}% MFU", title_justify="left")
    for col in ("#", "layout (flags)", "dp", "peak GiB", "bubble", "tp/pp/dp traffic per GPU", "s/step",
                "tokens/s"):
        table.add_column(col, justify="left" if col.startswith("layout") else "right")
    for i, cand in enumerate(found[:5], 1):
        est = cand.estimate
        comm = " / ".join(_fmt_bytes(est.comm[k]) for k in ("tp", "pp", "dp"))
        table.add_row(str(i), cand.flags(), str(est.shape.dp), f"{est.peak_gib:.1f}", f"{100 * est.bubble:.1f}%",
                      comm, f"{est.est_step_s:.3g}", f"{est.tokens_per_s:,.0f}")
    console.print(table)
    console.print("all of them: --json; check one: hpcmega plan <same flags> <layout flags>")


def _print_measured(console, measured: dict[str, Any]) -> None:
    from rich.table import Table

    keys = ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "peak_gib")
    table = Table(title="measured on a fake process group / estimated, MiB per GPU", title_justify="left")
    for col in ("stage", "params", "grads", "optimizer", "activations", "peak"):
        table.add_column(col, justify="right")
    estimated = {r["stage"]: r for r in measured["estimate_of_measured"]["stages"]}
    for r in measured["memory"]["stages"]:
        e = estimated[r["stage"]]
        table.add_row(str(r["stage"]), *(f"{r[k] * 1024:.1f} / {e[k] * 1024:.1f}" for k in keys))
    console.print(table)
    (mode, got), = measured["activation_bytes_per_layer"].items()
    want = measured["estimate_of_measured"]["activation_bytes_per_layer"][mode]
    console.print(f"activations per layer ({mode}): measured {_fmt_bytes(got)}, estimated {_fmt_bytes(want)}")
    console.print(f"schedule run for {measured['microbatches_run']} microbatches (later steady rounds repeat the "
                  "same peak); token ids and receive buffers are allocated for every microbatch")


def print_table(layout, summary: dict[str, Any], warnings: list[str]) -> None:
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
    head.add_row("model", f"{s['model']} ({s['family']}): {s['n_layers']} layers, {s['n_heads']} heads, "
                 f"d_model={s['d_model']}, ffn={s['ffn_hidden']}, vocab={s['vocab_size']}{_kv_line(s, layout.tp)}")
    head.add_row("pipeline", f"schedule={s['schedule']}, {s['stages_per_rank']} stage(s) per rank, "
                 f"{s['layers_per_stage']} layer(s) per stage")
    head.add_row("batch", f"global_batch={s['global_batch']} = dp {layout.dp} x micro_batch {s['micro_batch']} x "
                 f"{s['microbatches']} microbatches, seq_len={s['seq_len']}")
    head.add_row("other", f"data_parallel={s['data_parallel']}, sequence_parallel={s['sequence_parallel']}, "
                 f"recompute={s['recompute']}, precision={s['precision']}")
    for i, c in enumerate(s["chosen"]):
        head.add_row("chosen" if i == 0 else "", f"{c['key'].split('.')[-1]} {c['value']} ({c['source']})")
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
@click.option("--no-memory-check", is_flag=True, help="Do not refuse a layout that does not fit GPU memory.")
@click.option("--auto", is_flag=True, help="Search tp/pp/schedule/micro-batch/recompute; list what fits, fastest first.")
@click.option("--measure", is_flag=True, help="Run the real engine for the first, last and worst rank at full size on "
                                              "fake tensors and a fake process group; show measured bytes.")
@pass_config(chosen=True)
def plan(cfg, chosen, as_json: bool, placement_kind: str, node_names: str | None, no_memory_check: bool,
         auto: bool, measure: bool) -> None:
    """Validate a config and show its TP/PP/DP groups and the nodes each spans.

    \b
    hpcmega plan --nodes 4 --tp 8 --pp 2 --model gpt-7b
    hpcmega plan --config launch/gpt2-124m-4node.toml --json
    hpcmega plan --auto --model gpt-7b --nodes 4 --gpus-per-node 8 --gpu h100
    """
    if auto:
        return _auto(cfg, as_json)
    layout, warnings = build_plan(cfg, placement_kind, node_names)
    est, notes = memory_check(cfg, no_memory_check)
    measured = None
    if measure:
        from hpcmega.bench.measure import measure as run_measure

        measured = run_measure(cfg)
    summary = config_summary(cfg, placement_kind, chosen)
    if as_json:
        data = layout.to_json()
        data["warnings"] = warnings + [n.removeprefix("warning: ") for n in notes if n.startswith("warning: ")]
        data["config"] = summary
        data.update(est.to_json())
        if measured is not None:
            data["measured"] = measured
        click.echo(json.dumps(data, indent=2))
    else:
        print_table(layout, summary, warnings)
        print_estimate(est, notes, measured)


def register(main: click.Group) -> None:
    main.add_command(plan)

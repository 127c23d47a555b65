"""`hpcmega bench`: the fixed benchmark of parallel layouts (see hpcmega.bench)."""
from __future__ import annotations

import json

import click

from hpcmega.config import MAX_COUNT
from hpcmega.errors import ConfigError


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _print_timing(rows: list[dict]) -> None:
    click.echo(f"{'configuration':<28}{'procs':>6}{'min':>8}{'median':>8}{'max':>8}{'tokens/s':>10}{'ratio':>7}"
               f"{'goal':>7}  met")
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        click.echo(f"{r['name']:<28}{r['procs']:>6}{r['ms_min']:>8.0f}{r['ms_median']:>8.0f}{r['ms_max']:>8.0f}"
                   f"{r['tokens_per_s']:>10.0f}{_fmt(r['ratio'], '.2f') or '1.00':>7}{_fmt(r['goal'], '.2f'):>7}"
                   f"  {met}")
    click.echo("ms per step (min/median/max over all measured steps); ratio = median / the single-process median; "
               "goals relative to a reference are goal x its ratio.")
    from hpcmega.bench.runner import baseline_disagreement

    spread = baseline_disagreement(rows)
    if spread > 0.10:
        click.echo(f"warning: the single-process baselines differ by {100 * spread:.0f}% in tokens/s although they do "
                   "the same work per token; the machine was not quiet for one of them, so ratios against it are off "
                   "by as much -- rerun with --repeats 3")


def _print_comm(rows: list[dict]) -> None:
    click.echo(f"{'configuration':<28}{'dim':>5}{'measured B':>14}{'planned B':>14}{'ratio':>8}")
    for r in rows:
        for dim in ("tp", "pp", "dp"):
            got, want = r["measured_bytes"].get(dim, 0), r["planned_bytes"][dim]
            if got or want:
                click.echo(f"{r['name']:<28}{dim:>5}{got:>14,}{want:>14,}{_fmt(r['ratio'].get(dim), '.3f'):>8}")
        ops = ", ".join(f"{k} x{v['count']}" for k, v in r["collectives"].items())
        click.echo(f"{'':<28}  collectives per step: {ops}")


def _print_gpu(rows: list[dict]) -> None:
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        click.echo(f"{r['name']:<12} {r['device']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, "
                   f"peak {r['peak_mem_gib']:.1f} GiB, {r['ms_median']:.0f} ms/step (b={r['micro_batch']}, s=1024)")


@click.command("bench")
@click.option("--steps", type=click.IntRange(1, MAX_COUNT), default=3, show_default=True,
              help="Measured steps per run.")
@click.option("--warmup", type=click.IntRange(0, MAX_COUNT), default=2, show_default=True,
              help="Unmeasured first steps.")
@click.option("--repeats", type=click.IntRange(1, 1000), default=1, show_default=True, help="Interleaved repeats.")
@click.option("--only", multiple=True, help="Run only cases whose name contains this (baselines are kept).")
@click.option("--comm", is_flag=True, help="Measure bytes per step per mesh dimension and collective instead of "
                                           "time, against the planner's count.")
@click.option("--gpu", is_flag=True, help="One GPU: gpt2-124m and gpt2-350m, bf16, compiled: tokens/s, MFU, peak "
                                          "memory.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench(steps: int, warmup: int, repeats: int, only: tuple[str, ...], comm: bool, gpu: bool,
          as_json: bool) -> None:
    """Time tp=2, dp=2 and pp=2 against single-process runs of the same global batch and against hand-written
    references (explicit TP, DDP), in one invocation."""
    if comm and gpu:
        raise ConfigError("--comm and --gpu measure different things; pass one of them")
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--gpu needs a CUDA GPU and none is visible; run it on a GPU node")
        from hpcmega.bench.gpu import run_gpu_bench

        rows = run_gpu_bench(steps=max(steps, 10), warmup=max(warmup, 5))
        click.echo(json.dumps(rows, indent=2)) if as_json else _print_gpu(rows)
        return
    from hpcmega.bench.cases import comm_cases, default_cases, select

    cases = comm_cases() if comm else default_cases()
    if only:
        chosen = select(cases, only)
        if not chosen:
            raise ConfigError(f"--only {' '.join(only)} matches no case; cases: {', '.join(c.name for c in cases)}")
        cases = [c for c in chosen if c.comm] if comm else chosen
    from hpcmega.bench.runner import run_bench, run_comm

    rows = run_comm(cases) if comm else run_bench(cases, steps=steps, warmup=warmup, repeats=repeats)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        (_print_comm if comm else _print_timing)(rows)


def register(main: click.Group) -> None:
    main.add_command(bench)

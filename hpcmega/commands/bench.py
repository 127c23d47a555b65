"""`hpcmega bench`: the fixed benchmark of parallel layouts (see hpcmega.bench)."""
from __future__ import annotations

import json

import click


@click.command("bench")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Measured steps per run.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Unmeasured first steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Interleaved repeats.")
@click.option("--only", multiple=True, help="Run only cases whose name contains this (baselines are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench(steps: int, warmup: int, repeats: int, only: tuple[str, ...], as_json: bool) -> None:
    """Time tp=2, dp=2 and pp=2 against single-process runs of the same global batch, in one invocation."""
    from hpcmega.bench import default_cases, run_bench

    cases = default_cases()
    if only:
        chosen = [c for c in cases if any(o in c.name for o in only)]
        if not chosen:
            raise click.UsageError(f"--only {' '.join(only)} matches no case; cases: {', '.join(c.name for c in cases)}")
        needed = {c.baseline for c in chosen if c.baseline}
        cases = [c for c in cases if c in chosen or c.name in needed]
    rows = run_bench(cases, steps=steps, warmup=warmup, repeats=repeats)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'configuration':<24}{'procs':>6}{'ms/step':>10}{'tokens/s':>10}{'ratio':>8}{'goal':>7}  met")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "1.00"
        goal = f"{r['goal']:.2f}" if r["goal"] is not None else ""
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        click.echo(f"{r['name']:<24}{r['procs']:>6}{r['ms_per_step']:>10.0f}{r['tokens_per_s']:>10.0f}"
                   f"{ratio:>8}{goal:>7}  {met}")


def register(main: click.Group) -> None:
    main.add_command(bench)

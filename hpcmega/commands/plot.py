"""`hpcmega plot RUN`: loss, val_loss and throughput from metrics.jsonl as terminal sparklines, and as a PNG with
--out (matplotlib, the optional `plot` extra) -- for runs whose W&B UI is out of reach (offline clusters)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from hpcmega.errors import ConfigError

# (metrics.jsonl key, label, format of the numbers)
SERIES = (("loss", "loss", ".4f"), ("val_loss", "val_loss", ".4f"), ("tokens_per_s", "tok/s", ".0f"))


@click.command("plot")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Also write a PNG (needs: pip install 'hpcmega[plot]').")
@click.option("--width", type=click.IntRange(min=10), default=60, show_default=True, help="Sparkline width.")
def plot(run: str, out: str | None, width: int) -> None:
    """Sparklines of loss, val_loss and tokens/s for RUN; --out FILE.png draws them with restarts marked."""
    from hpcmega.commands.runs import run_folder_arg
    from hpcmega.runs.progress import sparkline

    if out and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--out needs matplotlib, which is optional: pip install 'hpcmega[plot]' (the "
                          "sparklines work without it)")
    if out and not Path(out).absolute().parent.is_dir():
        raise ConfigError(f"--out {out}: folder {Path(out).absolute().parent} does not exist; create it or "
                          "write the PNG elsewhere")
    if out and Path(out).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"--out {out}: name a .png (or .pdf, .svg) file")
    folder = run_folder_arg(run)
    records = folder.steps()
    if not records:
        raise ConfigError(f"{folder.name} has no steps in metrics.jsonl yet; try again once it has trained")
    for key, label, fmt in SERIES:
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        values = [v for _, v in points]
        best = min(points, key=lambda p: p[1]) if key != "tokens_per_s" else max(points, key=lambda p: p[1])
        click.echo(f"{label:<9}{sparkline(values, width)}  {values[0]:{fmt}} -> {values[-1]:{fmt}}  "
                   f"({'min' if key != 'tokens_per_s' else 'max'} {best[1]:{fmt}} at step {best[0]}; "
                   f"steps {points[0][0]}-{points[-1][0]})")
    restarts = [e for e in folder.metrics() if e.get("event") == "restart"]
    if restarts:
        click.echo("restarts after step " + ", ".join(str(e.get("last_step_before", "?")) for e in restarts))
    if out:
        _png(records, restarts, out, folder.name)
        click.echo(f"wrote {out}")


def _png(records, restarts, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tput) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label, _ in SERIES[:2]:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_tput.plot([r["step"] for r in records], [r.get("tokens_per_s", 0.0) for r in records], color="tab:green")
    ax_tput.set_ylabel("tokens/s")
    ax_tput.set_xlabel("step")
    for event in restarts:
        for ax in (ax_loss, ax_tput):
            ax.axvline(event.get("last_step_before", 0), color="gray", linestyle=":", linewidth=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def register(main: click.Group) -> None:
    main.add_command(plot)

"""`hpcmega config show`: the fully resolved configuration, derived values filled in, optionally with the source
of every value (default, preset, which file, which flag, --set)."""
from __future__ import annotations

import copy
from typing import Any

import click

from hpcmega.commands.options import pass_config


@click.group("config")
def config_group() -> None:
    """Inspect configurations."""


def _toml_value(value: Any) -> str:
    import tomli_w

    from hpcmega.config import toml_safe

    if isinstance(value, dict):  # an inline table keeps one line per field ([cluster.env])
        return "{" + ", ".join(f"{tomli_w.dumps({k: 0}).split('=')[0].strip()} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": toml_safe(value)}).split("=", 1)[1].strip()


def resolved_view(cfg, run_dir: str | None) -> Any:
    """A copy with what the job derives written out: dp, microbatches and the run folder."""
    from hpcmega.runs.files import RunFolder

    out = copy.deepcopy(cfg)
    out.parallel.dp, out.parallel.microbatches = cfg.dp, cfg.microbatches
    out.run_dir = run_dir or cfg.run_dir or f"{RunFolder.decide(None, cfg).given} (not created)"
    return out


def render(cfg, sources: dict[str, str] | None = None) -> str:
    """TOML, with ``# <source>`` after each value when ``sources`` is given."""
    from hpcmega.config import FIELDS, get_value

    lines: list[str] = []
    section = ""
    for key in sorted(FIELDS, key=lambda k: "." in k):  # top-level keys must come before the first [section]
        head, _, name = key.rpartition(".")
        if head != section and head:
            lines.append(f"{'' if not lines else chr(10)}[{head}]")
            section = head
        line = f"{name} = {_toml_value(get_value(cfg, key))}"
        if sources is not None:
            line = f"{line:<40} # {sources.get(key, 'derived')}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@config_group.command("show")
@click.option("--sources", "show_sources", is_flag=True, help="Show where each value came from.")
@click.option("--run-dir", help="Run folder to show (default: the one `run`/`submit` would create).")
@pass_config(sources=True)
def show(cfg, sources: dict[str, str], show_sources: bool, run_dir: str | None) -> None:
    """Print the resolved config (defaults <- preset <- site <- files <- flags <- --set) as TOML, with the derived
    dp, microbatches and run folder.

    \b
    hpcmega config show --site example --config launch/gpt2-124m-4node.toml --set train.lr=3e-4 --sources
    """
    view = resolved_view(cfg, run_dir)
    derived = {k: "derived" for k in ("parallel.dp", "parallel.microbatches")
               if getattr(cfg.parallel, k.split(".")[1]) == 0}
    if not (run_dir or cfg.run_dir):
        derived["run_dir"] = "derived"
    click.echo(render(view, {**sources, **derived} if show_sources else None), nl=False)


def register(main: click.Group) -> None:
    main.add_command(config_group)

"""Does a configuration fit its GPUs? The check `plan` and `submit` run before anything is written or queued.

A layout that does not fit is refused with the change that would make it fit, found by re-running the estimator on
candidate changes (recompute, pipeline/tensor parallel size, micro-batch, precision, more nodes) -- each one a flag
the user can type. A layout above ``WARN_FRACTION`` of GPU memory runs but is warned about: the allocator's
fragmentation, the CUDA context and NCCL buffers live in that last 10%. Pure Python.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from hpcmega.config import Config
from hpcmega.errors import ConfigError
from hpcmega.planning.estimate import GIB, Estimate, Shape, estimate, estimate_config
from hpcmega.planning.search import nodes_that_fit, search
from hpcmega.planning.validate import validate

WARN_FRACTION = 0.9


@dataclass
class MemoryVerdict:
    estimate: Estimate
    error: str | None  # set when the layout does not fit
    warning: str | None  # set when it fits with less than 10% to spare


def need_text(est: Estimate) -> str:
    worst = est.worst
    return (f"needs {worst.peak / GIB:.1f} GiB per GPU on stage {worst.stage} "
            f"(activations {worst.activations / GIB:.1f}) but {est.gpu.name if est.gpu else 'the GPU'} "
            f"has {est.gpu_mem_gib:.1f} GiB")


def check_memory(cfg: Config) -> MemoryVerdict:
    est = estimate_config(cfg)
    if not est.fits:
        fixes = suggest_fixes(cfg)
        hint = ("try " + ", or ".join(fixes)) if fixes else "no layout of at most 1024 nodes fits"
        return MemoryVerdict(est, f"{need_text(est)}: {hint} (--no-memory-check skips this check)", None)
    if est.peak_gib > WARN_FRACTION * est.gpu_mem_gib:
        return MemoryVerdict(est, None, f"{need_text(est)} ({100 * est.peak_gib / est.gpu_mem_gib:.0f}%): little "
                                        "room for fragmentation, the CUDA context and NCCL buffers")
    return MemoryVerdict(est, None, None)


# -- candidate changes ----------------------------------------------------------------------------------------------
def _changed(cfg: Config, edit: Callable[[Config], None]) -> Config:
    new = copy.deepcopy(cfg)
    edit(new)
    return new


def _set(section: str, key: str, value) -> Callable[[Config], None]:
    def edit(c: Config) -> None:
        setattr(getattr(c, section), key, value)
        if section == "parallel" and key in ("tp", "pp"):
            c.parallel.dp = 0  # derived again from the world size
    return edit


def candidate_changes(cfg: Config) -> list[tuple[str, Callable[[Config], None]]]:
    """(flag text, edit) for each one-flag change worth trying, cheapest to the user first."""
    p, c = cfg.parallel, cfg.cluster
    out: list[tuple[str, Callable[[Config], None]]] = []
    for mode in ("selective", "full"):
        if p.recompute != mode and not (p.recompute == "full" and mode == "selective"):
            out.append((f"--recompute {mode}", _set("parallel", "recompute", mode)))
    if cfg.train.precision == "fp32":
        out.append(("--precision bf16", _set("train", "precision", "bf16")))
    if cfg.train.micro_batch > 1:
        out.append((f"--micro-batch {cfg.train.micro_batch // 2}",
                    _set("train", "micro_batch", cfg.train.micro_batch // 2)))
    domain = c.gpus_per_node * c.nvlink_domain_nodes
    for tp in (p.tp * 2, p.tp * 4, p.tp * 8):
        if tp <= domain:
            out.append((f"--tp {tp}", _set("parallel", "tp", tp)))
    for pp in (p.pp * 2, p.pp * 4, p.pp * 8):
        out.append((f"--pp {pp}", _set("parallel", "pp", pp)))
    for nodes in (c.nodes * 2, c.nodes * 4):
        out.append((f"--nodes {nodes}", _set("cluster", "nodes", nodes)))
    return out


def _fits(cfg: Config) -> bool:
    try:
        validate(cfg)
        return bool(estimate_config(cfg).fits)
    except ConfigError:
        return False


def suggest_fixes(cfg: Config, limit: int = 2) -> list[str]:
    """Up to ``limit`` single-flag changes that make ``cfg`` fit; else the first pair of flags that does; else the
    fastest layout of these nodes that fits (`plan --auto`); else the fewest nodes (doubling) with one that fits."""
    changes = candidate_changes(cfg)
    single = [flag for flag, edit in changes if _fits(_changed(cfg, edit))]
    if single:
        return _distinct_kinds(single)[:limit]
    for i, (flag_a, edit_a) in enumerate(changes):
        for flag_b, edit_b in changes[i + 1:]:
            if flag_a.split()[0] != flag_b.split()[0] and _fits(_changed(_changed(cfg, edit_a), edit_b)):
                return [f"{flag_a} {flag_b}"]
    found = search(cfg)
    if found:
        return [found[0].flags()]
    bigger = nodes_that_fit(cfg)
    return [f"--nodes {bigger.cfg.cluster.nodes} {bigger.flags()}"] if bigger else []


def _distinct_kinds(flags: list[str]) -> list[str]:
    """The first (smallest) working value of each flag: '--pp 4' but not also '--pp 8'."""
    seen: set[str] = set()
    out = []
    for flag in flags:
        kind = flag.split()[0]
        if kind not in seen:
            seen.add(kind)
            out.append(flag)
    return out


def memory_gate(cfg: Config, skip: bool = False) -> tuple[Estimate, list[str]]:
    """The memory check as `plan` and `submit` run it -> (estimate, lines to show). Raises ConfigError (exit 2)
    when the layout does not fit. CPU jobs are not checked against a GPU; ``skip`` checks nothing and says so."""
    if cfg.cluster.cpu:
        est = estimate(Shape.from_config(cfg), None, None, cfg.cluster.mfu)
        return est, ["CPU job: no GPU memory check"]
    if skip:
        est = estimate_config(cfg)
        return est, [f"memory check skipped (--no-memory-check); the estimate {need_text(est)}"]
    verdict = check_memory(cfg)
    if verdict.error:
        raise ConfigError(verdict.error)
    return verdict.estimate, [f"warning: {verdict.warning}"] if verdict.warning else []

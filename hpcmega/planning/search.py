"""`hpcmega plan --auto`: every layout of the given nodes that validates and fits, ranked by estimated step time.

Searched: tp (divisors of the NVLink domain, so a TP group never leaves it -- Narayanan et al. 2021 takeaway #1),
pp, schedule (1f1b, gpipe, interleaved-1f1b with 2 or 4 chunks per rank), micro-batch size and recompute mode,
and at pp = 1 with several microbatches whether FSDP2 reduce-scatters after every microbatch (sharded gradients,
m x the reduce-scatter traffic) or only after the last (an unsharded fp32 gradient for the step): memory against
traffic, both estimated.
Kept from the config: model, global batch, sequence length, precision, nodes and GPUs. Sequence parallelism is on
whenever tp > 1 (it only removes activation memory). Each candidate goes through the same ``validate`` as a real
run, so everything listed can be run as printed. Pure Python: a few thousand estimates take well under a second.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

from hpcmega.config import Config, RECOMPUTE_MODES
from hpcmega.errors import ConfigError
from hpcmega.planning.dims import divisors
from hpcmega.planning.estimate import Estimate, Shape, estimate, gpu_of
from hpcmega.planning.validate import validate

MICRO_BATCHES = (1, 2, 4, 8)
SCHEDULE_CHOICES = (("1f1b", 1), ("gpipe", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4))


@dataclass
class Candidate:
    cfg: Config
    estimate: Estimate

    def flags(self) -> str:
        """The command-line flags that select this layout."""
        c, p = self.cfg, self.cfg.parallel
        out = [f"--tp {p.tp}", f"--pp {p.pp}"]
        if p.pp > 1:
            out.append(f"--schedule {p.schedule}")
            if p.virtual_stages > 1:
                out.append(f"--virtual-stages {p.virtual_stages}")
        out += [f"--micro-batch {c.train.micro_batch}", f"--recompute {p.recompute}"]
        if p.reduce_every_microbatch is False:
            out.append("--no-reduce-every-microbatch")
        return " ".join(out)

    def to_json(self) -> dict:
        sh = self.estimate.shape
        return {
            "tp": sh.tp, "pp": sh.pp, "dp": sh.dp, "schedule": sh.schedule if sh.pp > 1 else None,
            "virtual_stages": sh.v, "micro_batch": sh.b, "microbatches": sh.m, "recompute": sh.recompute,
            "sequence_parallel": sh.sp, "reduce_every_microbatch": sh.reduce_every_microbatch,
            "flags": self.flags(), "tokens_per_s": self.estimate.tokens_per_s,
            **self.estimate.to_json(),
        }


def layouts(cfg: Config) -> Iterator[Config]:
    """Every candidate config (not yet validated)."""
    c = cfg.cluster
    domain = c.gpus_per_node * c.nvlink_domain_nodes
    world = cfg.world_size
    for tp in divisors(domain):
        if world % tp:
            continue
        for pp in divisors(world // tp):
            schedules = SCHEDULE_CHOICES if pp > 1 else (("1f1b", 1),)
            for schedule, v in schedules:
                for mb in MICRO_BATCHES:
                    for recompute in RECOMPUTE_MODES:
                        new = copy.copy(cfg)
                        new.parallel = copy.copy(cfg.parallel)
                        new.train = copy.copy(cfg.train)
                        p = new.parallel
                        p.tp, p.pp, p.dp, p.microbatches = tp, pp, 0, 0
                        p.schedule, p.virtual_stages, p.recompute = schedule, v, recompute
                        p.sequence_parallel = True
                        new.train.micro_batch = mb
                        yield new
                        if pp == 1 and new.reduce_every_microbatch and new.microbatches > 1:
                            once = copy.copy(new)
                            once.parallel = copy.copy(new.parallel)
                            once.parallel.reduce_every_microbatch = False
                            yield once


def search(cfg: Config) -> list[Candidate]:
    """Layouts that validate and fit, fastest (estimated) first."""
    gpu, mem = gpu_of(cfg)
    found = []
    for new in layouts(cfg):
        try:
            validate(new)
        except ConfigError:
            continue
        est = estimate(Shape.from_config(new), gpu, mem, cfg.cluster.mfu)
        if est.fits:
            found.append(Candidate(new, est))
    found.sort(key=lambda cand: (cand.estimate.est_step_s, cand.estimate.peak_gib))
    return found


def nodes_that_fit(cfg: Config, max_nodes: int = 1024) -> Candidate | None:
    """The best layout on the fewest nodes (doubling from the configured count) that fits, or None."""
    nodes = cfg.cluster.nodes * 2
    while nodes <= max_nodes:
        bigger = copy.deepcopy(cfg)
        bigger.cluster.nodes = nodes
        found = search(bigger)
        if found:
            return found[0]
        nodes *= 2
    return None

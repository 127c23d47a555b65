"""Where ranks really are -> (pp, dp, tp) coordinates and process groups. Pure Python, no torch.

Global rank numbers say nothing reliable about where a rank runs: SLURM's cyclic distribution, a heterogeneous
allocation or a multi-node NVLink domain all break the "consecutive ranks share a node" assumption. So the layout
is computed from the placement itself:

1. Put the ranks in a *logical order*: NVLink domains in order of their lowest global rank, inside a domain the
   nodes in order of their lowest global rank, inside a node by local rank.
2. Walk that order and hand out coordinates with TP varying fastest, then DP then PP (``tp-dp-pp``, Megatron's
   default) or then PP then DP (``tp-pp-dp``).

Because every domain holds a multiple of tp ranks (refused otherwise), every TP group lies inside one domain.
With block placement the logical order is the global rank order and the result is the textbook layout.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from hpcmega.config import RANK_ORDERS
from hpcmega.errors import ConfigError
from hpcmega.planning.dims import ParallelDims, divisors

if TYPE_CHECKING:
    from hpcmega.config import Config


class LayoutError(ConfigError):
    """A placement/parallel-size combination that cannot form valid groups; the message names the fix."""


@dataclass(frozen=True)
class RankPlacement:
    """Where one global rank runs: the node's name and the rank's index on that node."""

    node: str
    local_rank: int


@dataclass(frozen=True)
class RankCoord:
    """A rank's position: where it runs and its coordinate along each parallel dimension."""

    node: str
    local_rank: int
    tp: int
    pp: int
    dp: int

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "local_rank": self.local_rank, "tp": self.tp, "pp": self.pp, "dp": self.dp}


def default_node_names(nodes: int) -> list[str]:
    return [f"node{i + 1}" for i in range(nodes)]


def _names(nodes: int, per_node: int, node_names: Sequence[str] | None) -> list[str]:
    if nodes < 1 or per_node < 1:
        raise LayoutError(f"nodes={nodes} and ranks per node={per_node} must both be >= 1")
    names = list(node_names) if node_names is not None else default_node_names(nodes)
    if len(names) != nodes:
        raise LayoutError(f"{len(names)} node names for {nodes} nodes; give exactly one name per node")
    if len(set(names)) != len(names):
        raise LayoutError(f"node names repeat ({', '.join(names)}); give each node a distinct name")
    return names


def block_placement(nodes: int, per_node: int, node_names: Sequence[str] | None = None) -> list[RankPlacement]:
    """SLURM's block distribution (and torchrun's): ranks 0..per_node-1 on the first node, and so on."""
    names = _names(nodes, per_node, node_names)
    return [RankPlacement(names[r // per_node], r % per_node) for r in range(nodes * per_node)]


def cyclic_placement(nodes: int, per_node: int, node_names: Sequence[str] | None = None) -> list[RankPlacement]:
    """SLURM's cyclic distribution: rank r on node r % nodes, as local rank r // nodes."""
    names = _names(nodes, per_node, node_names)
    return [RankPlacement(names[r % nodes], r // nodes) for r in range(nodes * per_node)]


def domains_by_block(node_names: Sequence[str], nodes_per_domain: int) -> dict[str, str]:
    """Group nodes into NVLink domains of ``nodes_per_domain`` consecutive nodes (the last one may be smaller).

    Used when only the domain size is known (e.g. ``cluster.nvlink_domain_nodes=18`` for NVL72 trays); a job
    that can read each GPU's fabric clique id should pass the real mapping instead.
    """
    if nodes_per_domain < 1:
        raise LayoutError(f"nodes per NVLink domain must be >= 1, got {nodes_per_domain}")
    return {name: f"domain{i // nodes_per_domain}" for i, name in enumerate(node_names)}


def _check_sizes(world: int, tp: int, pp: int, order: str) -> int:
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name}={value!r} must be a positive integer; use --{name} 1 or more")
    if order not in RANK_ORDERS:
        raise LayoutError(f"unknown rank order {order!r}; use one of: {', '.join(RANK_ORDERS)}")
    if world == 0:
        raise LayoutError("the placement is empty; a layout needs at least one rank")
    fixes = f"choose tp x pp among the divisors of {world}: {', '.join(map(str, divisors(world)))}"
    return ParallelDims.split(world, tp, pp, ranks=f"the {world} placed ranks", fixes=fixes, error=LayoutError).dp


def _coords_from_logical(index: int, tp: int, pp: int, dp: int, order: str) -> tuple[int, int, int]:
    """(tp, pp, dp) coordinate of the rank at ``index`` in the logical order."""
    t, rest = index % tp, index // tp
    if order == "tp-dp-pp":
        return t, rest // dp, rest % dp
    return t, rest % pp, rest // pp  # tp-pp-dp


@dataclass
class Layout:
    """The (pp, dp, tp) coordinates of every global rank and the groups along each dimension.

    Groups are lists of global ranks sorted by the coordinate along that dimension (so ``pp_groups[i][s]`` runs
    pipeline stage ``s``); the list of groups is ordered by the logical position of each group's first member.
    """

    world_size: int
    tp: int
    pp: int
    dp: int
    order: str
    placement: list[RankPlacement]
    coords: list[RankCoord]
    domains: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    tp_groups: list[list[int]] = field(init=False)
    pp_groups: list[list[int]] = field(init=False)
    dp_groups: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.tp_groups, self.pp_groups, self.dp_groups = self._groups_from_coords()

    # -- derived views ----------------------------------------------------------------------------------------------
    def _grid(self) -> list[list[list[int]]]:
        grid = [[[-1] * self.tp for _ in range(self.dp)] for _ in range(self.pp)]
        for rank, c in enumerate(self.coords):
            if not (0 <= c.tp < self.tp and 0 <= c.pp < self.pp and 0 <= c.dp < self.dp):
                raise LayoutError(f"rank {rank} has coordinates outside tp={self.tp} pp={self.pp} dp={self.dp}")
            if grid[c.pp][c.dp][c.tp] != -1:
                raise LayoutError(f"ranks {grid[c.pp][c.dp][c.tp]} and {rank} share coordinates (pp, dp, tp)")
            grid[c.pp][c.dp][c.tp] = rank
        return grid

    def _groups_from_coords(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        grid = self._grid()
        P, D, T = self.pp, self.dp, self.tp
        tp_groups = [grid[p][d] for p in range(P) for d in range(D)]
        pp_groups = [[grid[p][d][t] for p in range(P)] for d in range(D) for t in range(T)]
        dp_groups = [[grid[p][d][t] for d in range(D)] for p in range(P) for t in range(T)]
        position = self._logical_position()

        def ordered(groups: list[list[int]]) -> list[list[int]]:
            return sorted((list(g) for g in groups), key=lambda g: position[g[0]])

        return ordered(tp_groups), ordered(pp_groups), ordered(dp_groups)

    def _logical_position(self) -> list[int]:
        """Inverse of the coordinate assignment: the index of each rank in the logical order."""
        out = []
        for c in self.coords:
            if self.order == "tp-dp-pp":
                out.append(c.tp + self.tp * (c.dp + self.dp * c.pp))
            else:
                out.append(c.tp + self.tp * (c.pp + self.pp * c.dp))
        return out

    def mesh_grid(self) -> list[list[list[int]]]:
        """Nested list ``[pp][dp][tp] -> global rank`` for ``DeviceMesh(..., mesh_dim_names=("pp", "dp", "tp"))``."""
        return self._grid()

    def rank_at(self, pp: int, dp: int, tp: int) -> int:
        return self._grid()[pp][dp][tp]

    def nodes_of(self, group: Iterable[int]) -> list[str]:
        """The distinct nodes a group of global ranks runs on, in the group's order."""
        seen: dict[str, None] = {}
        for rank in group:
            seen.setdefault(self.placement[rank].node, None)
        return list(seen)

    def domains_of(self, group: Iterable[int]) -> list[str]:
        seen: dict[str, None] = {}
        for rank in group:
            seen.setdefault(self.domains[self.placement[rank].node], None)
        return list(seen)

    # -- comparison -------------------------------------------------------------------------------------------------
    def differences(self, other: "Layout") -> list[str]:
        """What differs between two layouts' groups (node names are ignored: a plan uses node1..N, a job the
        real host names). Empty when every rank gets the same (pp, dp, tp) coordinates in both."""
        diffs = []
        for name in ("world_size", "tp", "pp", "dp"):
            if getattr(self, name) != getattr(other, name):
                diffs.append(f"{name} {getattr(self, name)} != {getattr(other, name)}")
        if diffs:
            return diffs
        for dim in ("tp", "pp", "dp"):
            mine = {tuple(g) for g in getattr(self, f"{dim}_groups")}
            theirs = {tuple(g) for g in getattr(other, f"{dim}_groups")}
            if mine != theirs:
                only = sorted(mine - theirs)[:3]
                diffs.append(f"{dim} groups differ, e.g. {[list(g) for g in only]} only in the first layout")
        return diffs

    def same_groups(self, other: "Layout") -> bool:
        return not self.differences(other)

    # -- (de)serialisation ------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The stable schema of ``hpcmega plan --json`` and of a run folder's ``layout.json``."""
        return {
            "world_size": self.world_size,
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            "order": self.order,
            "tp_groups": [list(g) for g in self.tp_groups],
            "pp_groups": [list(g) for g in self.pp_groups],
            "dp_groups": [list(g) for g in self.dp_groups],
            "mesh_grid": self.mesh_grid(),
            "rank_coords": [c.to_dict() for c in self.coords],
            "domains": dict(self.domains),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Layout":
        """Rebuild a layout from ``to_json()`` output, checking that the stored groups match the coordinates."""
        try:
            coords = [RankCoord(str(c["node"]), int(c["local_rank"]), int(c["tp"]), int(c["pp"]), int(c["dp"]))
                      for c in data["rank_coords"]]
            tp, pp, dp, order = int(data["tp"]), int(data["pp"]), int(data["dp"]), str(data["order"])
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"layout JSON is missing or has a bad field ({e}); regenerate it with hpcmega plan --json")
        if order not in RANK_ORDERS or min(tp, pp, dp) < 1:
            raise LayoutError(f"layout JSON has order={order!r} tp={tp} pp={pp} dp={dp}; regenerate it")
        if len(coords) != tp * pp * dp or int(data.get("world_size", len(coords))) != len(coords):
            raise LayoutError(f"layout JSON has {len(coords)} ranks but tp x pp x dp = {tp * pp * dp}; regenerate it")
        domains = {str(k): str(v) for k, v in (data.get("domains") or {}).items()}
        for c in coords:
            domains.setdefault(c.node, c.node)
        layout = cls(
            world_size=len(coords), tp=tp, pp=pp, dp=dp, order=order,
            placement=[RankPlacement(c.node, c.local_rank) for c in coords], coords=coords, domains=domains,
            warnings=[str(w) for w in data.get("warnings", [])],
        )
        for dim in ("tp", "pp", "dp"):
            stored = data.get(f"{dim}_groups")
            if stored is not None and sorted(map(tuple, stored)) != sorted(map(tuple, getattr(layout, f"{dim}_groups"))):
                raise LayoutError(f"layout JSON: {dim}_groups do not match rank_coords; regenerate it")
        return layout


def compute_layout(
    placement: Sequence[RankPlacement],
    tp: int,
    pp: int,
    order: str = "tp-dp-pp",
    domains: dict[str, str] | None = None,
) -> Layout:
    """Coordinates and groups for ranks placed as ``placement`` (indexed by global rank).

    ``domains`` maps node name -> NVLink domain id; by default every node is its own domain. Raises LayoutError
    when the placement has duplicates or a domain's rank count is not a multiple of tp (a TP group would have to
    cross a slow link).
    """
    placement = [RankPlacement(str(p.node), int(p.local_rank)) for p in placement]
    world = len(placement)
    dp = _check_sizes(world, tp, pp, order)
    _check_unique(placement)
    node_domain = _node_domains(placement, domains)
    _check_domains_hold_whole_tp_groups(placement, node_domain, tp)
    logical = _logical_order(placement, node_domain)
    coords: list[RankCoord | None] = [None] * world
    for index, rank in enumerate(logical):
        t, p_, d = _coords_from_logical(index, tp, pp, dp, order)
        coords[rank] = RankCoord(placement[rank].node, placement[rank].local_rank, t, p_, d)
    return Layout(
        world_size=world, tp=tp, pp=pp, dp=dp, order=order, placement=placement,
        coords=[c for c in coords if c is not None], domains=node_domain,
        warnings=_placement_warnings(placement, logical),
    )


def _check_unique(placement: list[RankPlacement]) -> None:
    seen: dict[RankPlacement, int] = {}
    for rank, p in enumerate(placement):
        if p.local_rank < 0:
            raise LayoutError(f"rank {rank} has local rank {p.local_rank} on {p.node}; local ranks start at 0")
        if p in seen:
            raise LayoutError(
                f"ranks {seen[p]} and {rank} both claim {p.node} local rank {p.local_rank}; "
                "each (node, local rank) must appear once — check the launcher's task placement"
            )
        seen[p] = rank


def _node_domains(placement: list[RankPlacement], domains: dict[str, str] | None) -> dict[str, str]:
    """node -> NVLink domain, nodes in order of first appearance (each node its own domain by default)."""
    nodes = list(dict.fromkeys(p.node for p in placement))
    if domains is None:
        return {node: node for node in nodes}
    missing = [n for n in nodes if n not in domains]
    if missing:
        raise LayoutError(
            f"node(s) {', '.join(missing)} have no NVLink domain; add them to the domain map "
            "(or leave it out so each node is its own domain)"
        )
    return {node: str(domains[node]) for node in nodes}


def _check_domains_hold_whole_tp_groups(placement: list[RankPlacement], node_domain: dict[str, str],
                                        tp: int) -> None:
    domain_count: dict[str, int] = {}
    for p in placement:
        domain_count[node_domain[p.node]] = domain_count.get(node_domain[p.node], 0) + 1
    for dom, count in domain_count.items():
        if count % tp:
            nodes = [n for n in node_domain if node_domain[n] == dom]
            where = f"node '{nodes[0]}'" if nodes == [dom] else f"NVLink domain {dom} ({', '.join(nodes)})"
            fits = divisors(math.gcd(*domain_count.values()))
            raise LayoutError(
                f"{where} holds {count} ranks, not a multiple of tp={tp}: a TP group would cross an NVLink domain; "
                f"use tp in ({', '.join(map(str, fits))}) or place a multiple of {tp} ranks on each domain"
            )


def _logical_order(placement: list[RankPlacement], node_domain: dict[str, str]) -> list[int]:
    """Global ranks sorted by (domain, node, local rank), domains and nodes by first appearance."""
    node_first: dict[str, int] = {}
    for rank, p in enumerate(placement):
        node_first.setdefault(p.node, rank)
    domain_first: dict[str, int] = {}
    for node, first in node_first.items():
        domain_first.setdefault(node_domain[node], first)
    return sorted(range(len(placement)), key=lambda r: (domain_first[node_domain[placement[r].node]],
                                                        node_first[placement[r].node], placement[r].local_rank))


def _placement_warnings(placement: list[RankPlacement], logical: list[int]) -> list[str]:
    warnings: list[str] = []
    if logical != list(range(len(placement))):
        warnings.append(
            "ranks are not block-placed (e.g. SLURM cyclic distribution): groups follow the real placement, "
            "so a TP group is not a run of consecutive global ranks"
        )
    per_node: dict[str, int] = {}
    for p in placement:
        per_node[p.node] = per_node.get(p.node, 0) + 1
    if len(set(per_node.values())) > 1:
        counts = ", ".join(f"{n}: {c}" for n, c in per_node.items())
        warnings.append(f"nodes hold different numbers of ranks ({counts})")
    return warnings


# -- the one placement -> NVLink domains -> layout sequence (plan, submit and every rank of a job use it) ----------
def natural_key(name: str) -> list[Any]:
    """Sort 'node2' before 'node10' (the order SLURM lists hosts in)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def layout_of(cfg: "Config", placement: Sequence[RankPlacement]) -> Layout:
    """The layout of ``cfg``'s tp/pp/order for ranks placed as ``placement``; NVLink domains are consecutive groups
    of ``cluster.nvlink_domain_nodes`` nodes in name order. Raises LayoutError (a ConfigError)."""
    nodes = sorted({p.node for p in placement}, key=natural_key)
    domains = domains_by_block(nodes, cfg.cluster.nvlink_domain_nodes)
    return compute_layout(list(placement), cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.order, domains)


def planned_layout(cfg: "Config", node_names: Sequence[str] | None = None, distribution: str = "block") -> Layout:
    """What `plan` shows and a job compares its real placement with: nodes x gpus_per_node ranks in SLURM's block
    (or cyclic) distribution over ``node_names`` (default node1..nodeN; a list of the wrong length is ignored)."""
    nodes = cfg.cluster.nodes
    names = list(node_names) if node_names and len(node_names) == nodes else default_node_names(nodes)
    place = cyclic_placement if distribution == "cyclic" else block_placement
    return layout_of(cfg, place(nodes, cfg.cluster.gpus_per_node, names))

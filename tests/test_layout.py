"""Layout from a placement: groups partition the world, TP stays inside an NVLink domain, for any placement."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcmega.errors import ConfigError
from hpcmega.planning.layout import (
    Layout,
    LayoutError,
    RankPlacement,
    block_placement,
    compute_layout,
    cyclic_placement,
    domains_by_block,
)


def test_seed_table_tp_pp_dp_order():
    """The README's table: 8 ranks on 2 nodes x 4, tp=pp=dp=2, order tp-pp-dp."""
    layout = compute_layout(block_placement(2, 4), tp=2, pp=2, order="tp-pp-dp")
    assert layout.dp == 2
    assert layout.tp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.pp_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.dp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_default_order_is_megatron_tp_dp_pp():
    layout = compute_layout(block_placement(2, 4), tp=2, pp=2)
    assert layout.order == "tp-dp-pp"
    assert layout.tp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.pp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.mesh_grid() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]


def test_four_nodes_by_eight_gpus_tp8_pp2():
    """The docs' worked example: one TP group per node, each pipeline spans two nodes."""
    layout = compute_layout(block_placement(4, 8), tp=8, pp=2)
    assert layout.dp == 2
    assert [layout.nodes_of(g) for g in layout.tp_groups] == [["node1"], ["node2"], ["node3"], ["node4"]]
    assert {tuple(layout.nodes_of(g)) for g in layout.pp_groups} == {("node1", "node3"), ("node2", "node4")}
    assert {tuple(layout.nodes_of(g)) for g in layout.dp_groups} == {("node1", "node2"), ("node3", "node4")}
    assert layout.warnings == []


def test_cyclic_placement_keeps_tp_groups_on_one_node():
    placement = cyclic_placement(2, 4)
    assert [p.node for p in placement[:4]] == ["node1", "node2", "node1", "node2"]
    layout = compute_layout(placement, tp=4, pp=1)
    # rank r sits on node r % 2: TP groups are the even and the odd ranks, in local-rank order
    assert layout.tp_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [layout.nodes_of(g) for g in layout.tp_groups] == [["node1"], ["node2"]]
    assert any("not block-placed" in w for w in layout.warnings)
    # the same physical layout as a block placement: each (node, local rank) gets the same coordinates
    block = compute_layout(block_placement(2, 4), tp=4, pp=1)
    by_place = {(c.node, c.local_rank): (c.tp, c.pp, c.dp) for c in block.coords}
    assert {(c.node, c.local_rank): (c.tp, c.pp, c.dp) for c in layout.coords} == by_place


def test_multi_node_nvlink_domain_allows_tp_across_nodes():
    placement = block_placement(4, 2)
    with pytest.raises(LayoutError, match="tp=4"):
        compute_layout(placement, tp=4, pp=1)
    layout = compute_layout(placement, tp=4, pp=1, domains=domains_by_block(["node1", "node2", "node3", "node4"], 2))
    assert [layout.nodes_of(g) for g in layout.tp_groups] == [["node1", "node2"], ["node3", "node4"]]
    assert [layout.domains_of(g) for g in layout.tp_groups] == [["domain0"], ["domain1"]]


@pytest.mark.parametrize(
    "placement, tp, pp, kwargs, words",
    [
        (block_placement(2, 4), 8, 1, {}, ["node1", "multiple of tp=8", "use tp in (1, 2, 4)"]),
        (block_placement(2, 4), 3, 1, {}, ["does not divide", "8"]),
        ([RankPlacement("a", 0), RankPlacement("a", 0)], 1, 1, {}, ["both claim", "a local rank 0"]),
        ([RankPlacement("a", -1)], 1, 1, {}, ["local ranks start at 0"]),
        ([], 1, 1, {}, ["empty"]),
        (block_placement(1, 2), 0, 1, {}, ["tp=0", "positive"]),
        (block_placement(1, 2), 1, 1, {"order": "dp-tp-pp"}, ["unknown rank order", "tp-dp-pp"]),
        (block_placement(2, 2), 2, 1, {"domains": {"node1": "x"}}, ["node2", "no NVLink domain"]),
    ],
)
def test_refusals_name_the_problem(placement, tp, pp, kwargs, words):
    with pytest.raises(LayoutError) as info:
        compute_layout(placement, tp, pp, **kwargs)
    assert isinstance(info.value, ConfigError)  # the CLI turns it into exit status 2
    for word in words:
        assert word in str(info.value)


def test_domain_refusal_names_the_domain_and_its_nodes():
    domains = {"node1": "rackA", "node2": "rackA", "node3": "rackA", "node4": "rackB"}
    placement = block_placement(4, 2)  # rackA: 6 ranks, rackB: 2 ranks; 8 ranks in all
    with pytest.raises(LayoutError) as info:
        compute_layout(placement, tp=4, pp=1, domains=domains)
    assert "NVLink domain rackA (node1, node2, node3) holds 6 ranks, not a multiple of tp=4" in str(info.value)
    assert "use tp in (1, 2)" in str(info.value)


def test_node_name_helpers_refuse_bad_names():
    with pytest.raises(LayoutError, match="one name per node"):
        block_placement(2, 2, ["a"])
    with pytest.raises(LayoutError, match="distinct"):
        cyclic_placement(2, 2, ["a", "a"])


def test_json_round_trip_and_group_comparison():
    layout = compute_layout(cyclic_placement(4, 2), tp=2, pp=2, order="tp-pp-dp")
    data = layout.to_json()
    for key in ("world_size", "tp", "pp", "dp", "order", "tp_groups", "pp_groups", "dp_groups", "rank_coords"):
        assert key in data
    assert data["rank_coords"][3] == {"node": "node4", "local_rank": 0, **{
        k: getattr(layout.coords[3], k) for k in ("tp", "pp", "dp")}}
    again = Layout.from_json(data)
    assert again.same_groups(layout) and again.mesh_grid() == layout.mesh_grid()
    # a job on real hosts with the planned placement pattern matches the plan; a different one does not
    real = compute_layout(cyclic_placement(4, 2, ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]), 2, 2, "tp-pp-dp")
    assert real.same_groups(layout)
    block = compute_layout(block_placement(4, 2), 2, 2, "tp-pp-dp")
    assert not block.same_groups(layout)
    assert any("tp groups differ" in d for d in block.differences(layout))
    broken = dict(data, tp_groups=[[0, 1]] + data["tp_groups"][1:])
    with pytest.raises(LayoutError, match="do not match"):
        Layout.from_json(broken)


# -- properties over random valid placements ---------------------------------------------------------------------------
@st.composite
def scenarios(draw):
    nodes = draw(st.integers(1, 6))
    per_node = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    domain_nodes = draw(st.integers(1, nodes))
    names = [f"n{i}" for i in range(nodes)]
    domains = domains_by_block(names, domain_nodes)
    counts = {}
    for name in names:
        counts[domains[name]] = counts.get(domains[name], 0) + per_node
    tp = draw(st.sampled_from([d for d in range(1, per_node * nodes + 1) if math.gcd(*counts.values()) % d == 0]))
    world = nodes * per_node
    pp = draw(st.sampled_from([d for d in range(1, world // tp + 1) if (world // tp) % d == 0]))
    order = draw(st.sampled_from(["tp-dp-pp", "tp-pp-dp"]))
    kind = draw(st.sampled_from(["block", "cyclic", "shuffled"]))
    if kind == "cyclic":
        placement = cyclic_placement(nodes, per_node, names)
    else:
        placement = block_placement(nodes, per_node, names)
        if kind == "shuffled":
            random.Random(draw(st.integers(0, 2**16))).shuffle(placement)
    use_domains = draw(st.booleans()) or domain_nodes > 1
    return placement, tp, pp, order, (domains if use_domains else None), kind


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_layout_properties(scenario):
    placement, tp, pp, order, domains, kind = scenario
    world = len(placement)
    layout = compute_layout(placement, tp, pp, order, domains)
    dp = world // (tp * pp)
    assert (layout.world_size, layout.tp, layout.pp, layout.dp) == (world, tp, pp, dp)

    # each dimension's groups partition the world, with the right count and size
    for groups, size in ((layout.tp_groups, tp), (layout.pp_groups, pp), (layout.dp_groups, dp)):
        assert len(groups) == world // size and all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))

    # coordinates agree with the groups: members share the other coordinates and count up along the group
    for groups, dim in ((layout.tp_groups, "tp"), (layout.pp_groups, "pp"), (layout.dp_groups, "dp")):
        others = [d for d in ("tp", "pp", "dp") if d != dim]
        for g in groups:
            assert [getattr(layout.coords[r], dim) for r in g] == list(range(len(g)))
            assert len({tuple(getattr(layout.coords[r], d) for d in others) for r in g}) == 1

    # the mesh grid is the coordinate map, and every rank appears once
    grid = layout.mesh_grid()
    assert (len(grid), len(grid[0]), len(grid[0][0])) == (pp, dp, tp)
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                c = layout.coords[grid[p][d][t]]
                assert (c.pp, c.dp, c.tp) == (p, d, t)
    assert sorted(r for plane in grid for row in plane for r in row) == list(range(world))

    # coordinates record where the rank really is
    assert [(c.node, c.local_rank) for c in layout.coords] == [(p.node, p.local_rank) for p in placement]

    # TP groups never leave an NVLink domain; with one domain per node they are runs of local ranks on one node
    node_domain = domains or {p.node: p.node for p in placement}
    for g in layout.tp_groups:
        assert len({node_domain[placement[r].node] for r in g}) == 1
        if domains is None:
            locals_ = [placement[r].local_rank for r in g]
            assert len(layout.nodes_of(g)) == 1
            assert locals_ == list(range(locals_[0], locals_[0] + tp)) and locals_[0] % tp == 0

    # block placement with per-node domains is the textbook formula on global ranks
    if kind == "block" and domains is None:
        for r, c in enumerate(layout.coords):
            if order == "tp-dp-pp":
                assert r == c.tp + tp * (c.dp + dp * c.pp)
            else:
                assert r == c.tp + tp * (c.pp + pp * c.dp)
        assert layout.warnings == []

    # the JSON form restores the same groups
    assert Layout.from_json(layout.to_json()).same_groups(layout)


def test_uneven_nodes_work_when_each_holds_whole_tp_groups():
    placement = [RankPlacement("big", i) for i in range(4)] + [RankPlacement("small", i) for i in range(2)]
    layout = compute_layout(placement, tp=2, pp=1)
    assert layout.tp_groups == [[0, 1], [2, 3], [4, 5]]
    assert any("different numbers of ranks (big: 4, small: 2)" in w for w in layout.warnings)


def test_plan_and_the_job_share_one_placement_to_layout_sequence():
    """`plan` (planned_layout) and every rank (layout_of on the gathered placement) build the layout the same way:
    NVLink domains are consecutive nodes in natural name order (node2 before node10), whatever order SLURM lists."""
    from hpcmega.config import load_config
    from hpcmega.planning.layout import layout_of, natural_key, planned_layout

    cfg = load_config(None, {"cluster.nodes": 4, "cluster.gpus_per_node": 2, "cluster.nvlink_domain_nodes": 2,
                             "parallel.tp": 4, "cluster.cpu": True, "train.global_batch": 8})
    names = ["node9", "node10", "node11", "node2"]
    assert sorted(names, key=natural_key) == ["node2", "node9", "node10", "node11"]
    real = layout_of(cfg, cyclic_placement(4, 2, names))
    assert real.domains == {"node2": "domain0", "node9": "domain0", "node10": "domain1", "node11": "domain1"}
    assert all(len({real.domains[real.coords[r].node] for r in group}) == 1 for group in real.tp_groups)
    assert real.same_groups(planned_layout(cfg, names, "cyclic"))
    assert planned_layout(cfg).same_groups(layout_of(cfg, block_placement(4, 2)))

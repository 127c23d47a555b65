"""Vocab-parallel embeddings keep their gradients sharded, at a realistic vocabulary/width ratio.

gpt-7b has vocab 50304 and width 4096 (ratio 12.3); these ranks use a quarter of both (12576 x 1024) so they build
and step in seconds on the fake process group (one process per rank, see hpcmega.parallel.fake_world). Before the
vocab-parallel embedding, the token embedding's gradient arrived as a Replicate DTensor of the full table on every
TP rank, and `plan --measure` found stage 0's peak at 2.9x the estimate at this shape (175.5 vs 61.1 MiB; gpt-7b:
4,706 vs 3,008 MiB). The invariance suite (tests/test_invariance.py) checks the values; this file the shapes and the
memory.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from hpcmega.config import Config, load_config, resolve_defaults

VOCAB, D = 12576, 1024
PEAK_TOLERANCE = 0.15  # the planner's agreement for the peak (tests/test_planning_measure.py)

# name -> (pp, dp, tp, fake rank, precision); bf16 (or dp > 1) puts the embedding under FSDP2 as well.
GRAD_CASES = {"tp8-fp32": (1, 1, 8, 3, "fp32"), "dp2-tp4-bf16": (1, 2, 4, 5, "bf16")}
MEASURED = {"model.vocab_size": VOCAB, "model.d_model": D, "model.n_heads": 8, "model.n_layers": 2,
            "model.max_seq_len": 128, "train.seq_len": 128, "train.global_batch": 2, "train.micro_batch": 1,
            "cluster.nodes": 1, "cluster.gpus_per_node": 16, "train.precision": "bf16", "parallel.recompute": "none",
            "parallel.tp": 8, "parallel.pp": 2}


def _cfg(tp: int, precision: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = VOCAB, D, 1, 8, 64
    cfg.parallel.tp = tp
    cfg.train.seq_len, cfg.train.global_batch, cfg.train.micro_batch, cfg.train.precision = 16, 2, 1, precision
    resolve_defaults(cfg, on_gpu=False)
    return cfg


def _grads(name: str) -> dict:
    """One fake rank: one training step's forward and backward; the embeddings' gradients as they leave backward."""
    from hpcmega.parallel.fake_world import fake_mesh, fake_world
    from hpcmega.parallel.parallelize import build_model_parts
    from hpcmega.parallel.pipeline import GradAccumulation

    pp, dp, tp, rank, precision = GRAD_CASES[name]
    with fake_world(pp * dp * tp, rank=rank):
        parts = build_model_parts(_cfg(tp, precision), fake_mesh(pp, dp, tp), torch.device("cpu"))
        ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
        GradAccumulation(parts, 1, tp).run(ids, ids)
        out = {}
        for pname in ("tok_emb.weight", "pos_emb.weight"):
            param = dict(parts.named_parameters())[pname]
            grad = param.grad
            out[pname] = {"param_local": tuple(param.to_local().shape), "grad_local": tuple(grad.to_local().shape),
                          "grad_bytes": grad.to_local().untyped_storage().nbytes(),
                          "same_placements": grad.placements == param.placements}
    return out


def _measure() -> dict:
    from hpcmega.bench.measure import measure_config

    got = measure_config(load_config(None, MEASURED))
    return {r.stage: (r.peak, got.estimate.ranks[r.stage].peak) for r in got.ranks}


def _case(index: int, names: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    name = names[index]
    result = _measure() if name == "measure" else _grads(name)
    torch.save(result, os.path.join(out_dir, f"{name}.pt"))


@pytest.fixture(scope="module")
def results() -> dict:
    names = [*GRAD_CASES, "measure"]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_case, args=(names, out_dir), nprocs=len(names), join=True, start_method="spawn")
        return {n: torch.load(os.path.join(out_dir, f"{n}.pt")) for n in names}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_embedding_gradients_are_this_ranks_rows_only(results, name):
    _, dp, tp, _, _ = GRAD_CASES[name]
    for pname, rows in (("tok_emb.weight", VOCAB), ("pos_emb.weight", 64)):
        got = results[name][pname]
        assert got["param_local"] == (rows // tp // dp, D), (pname, got)  # the parameter is the shard ...
        assert got["grad_local"] == got["param_local"], (pname, got)  # ... and so is its gradient
        assert got["same_placements"], pname
        if name == "tp8-fp32":  # without FSDP2 (whose gradients are views into one buffer per unit) ...
            assert got["grad_bytes"] == rows // tp * D * 4, (pname, got)  # ... it owns its storage: no full table


def test_stage0_peak_within_the_planners_tolerance(results):
    peaks = results["measure"]
    assert sorted(peaks) == [0, 1]
    for stage, (measured, estimated) in peaks.items():
        assert estimated == pytest.approx(measured, rel=PEAK_TOLERANCE), (stage, measured / 2**20, estimated / 2**20)

"""Initialisation after sharding: one rank of a 16-rank job (fake process group, pp=2 x dp=2 x tp=4) holds its own
shards plus, transiently, the full value of the one parameter being cut (the largest: the embedding / the head) --
never its whole stage -- and the shards it writes are exactly the pieces of the single-process model's parameters.

Peak memory is counted as live tensor bytes (hpcmega.parallel.memory.LiveTensorBytes, the CPU analogue of
``torch.cuda.max_memory_allocated``). Cutting a parameter sharded over both "dp" and "tp" on the same dimension
(FSDP2 on a column-parallel weight: DTensor's strided sharding) makes split copies inside ``distribute_tensor``:
measured up to 2.5x that parameter at once (its value plus the copies), hence the bound of 3 full values of the
largest parameter. Each fake rank runs in its own process (see hpcmega.parallel.fake_world).
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from hpcmega.config import Config, resolve_defaults
from hpcmega.models.common import build_model
from hpcmega.models.gpt2.model import GPT

PP, DP, TP = 2, 2, 4
FP32 = 4
RANKS = (*range(DP * TP), PP * DP * TP - 1)  # every (dp, tp) coordinate of pipeline stage 0, and the last rank


def _cfg() -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 1024, 256, 16, 8, 256
    cfg.parallel.pp, cfg.parallel.tp = PP, TP
    cfg.train.seq_len = 64
    resolve_defaults(cfg, on_gpu=False)
    return cfg


def _build(index: int, out_dir: str) -> None:
    """One fake rank, in its own process: build its model parts as the trainer does, record the peak of live tensor
    bytes, the bytes of its shards and the shards themselves."""
    from hpcmega.parallel.fake_world import fake_mesh, fake_world
    from hpcmega.parallel.memory import LiveTensorBytes, local_storages
    from hpcmega.parallel.parallelize import build_model_parts

    torch.set_num_threads(1)
    rank = RANKS[index]
    with fake_world(PP * DP * TP, rank=rank):
        tracker = LiveTensorBytes()
        with tracker:
            parts = build_model_parts(_cfg(), fake_mesh(PP, DP, TP), torch.device("cpu"))
        params = dict(parts.named_parameters())
        result = {
            "peak": tracker.peak,
            "local": sum(s.nbytes() for p in params.values() for s in local_storages(p)),
            "shards": {n: p.to_local().detach().clone() for n, p in params.items()},
            "stage": parts.stage_ids,
        }
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))


@pytest.fixture(scope="module")
def ranks() -> dict[int, dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_build, args=(out_dir,), nprocs=len(RANKS), join=True, start_method="spawn")
        return {r: torch.load(os.path.join(out_dir, f"{r}.pt")) for r in RANKS}


def _full_stage_bytes(stage: int) -> tuple[int, int]:
    """(bytes of the whole unsharded stage, bytes of its largest parameter), from shapes on the meta device."""
    with torch.device("meta"):
        model = GPT(_cfg().model)
    n = _cfg().model.n_layers // PP
    model.keep_only(range(stage * n, (stage + 1) * n), first=stage == 0, last=stage == PP - 1)
    sizes = [p.numel() * FP32 for p in model.parameters()]
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("rank", [0, PP * DP * TP - 1])  # pipeline stage 0 (embeddings) and the last (head)
def test_init_peak_is_bounded_by_the_shard_not_the_stage(ranks, rank):
    got = ranks[rank]
    (stage,) = got["stage"]
    full_stage, largest_param = _full_stage_bytes(stage)
    assert got["local"] * DP * TP <= full_stage * 1.01  # every parameter sharded or small (norms, biases)
    bound = got["local"] + 3 * largest_param  # the shards + one parameter's full value and its split copies
    assert got["peak"] <= bound, (got["peak"], bound, full_stage)
    assert got["peak"] < full_stage / 3, "init held (a large part of) the unsharded stage"


def test_shards_are_pieces_of_the_single_process_parameters(ranks):
    full = dict(build_model(_cfg().model, seed=0).named_parameters())
    stage0 = [ranks[r] for r in range(DP * TP)]
    for name in ("tok_emb.weight", "blocks.0.attn.wq.weight", "blocks.1.attn.wo.weight", "blocks.2.mlp.fc1.weight"):
        pieces = torch.cat([r["shards"][name].flatten() for r in stage0])
        assert pieces.numel() == full[name].numel(), name  # sharded over dp and tp: no overlap, nothing missing
        assert torch.equal(pieces.sort().values, full[name].detach().flatten().sort().values), name

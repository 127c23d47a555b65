"""Activation recompute keeps less for backward and changes no gradient.

Memory is measured two ways on the real model: autograd's saved tensors (``saved_tensors_hooks``), and the bytes
of every tensor produced during the forward that are still alive once it returns (storage weak references; this
also sees what selective recompute caches outside autograd's saved tensors). Parameters and the block output are
excluded: only what the block keeps *for backward* counts.

With tensor + sequence parallelism the same count runs on one rank of a fake process group of size t (real DTensor
shards and collectives' output buffers, no data moved) and is compared with Korthikanti et al. 2022, Table 2, per
layer in bf16 bytes: selective recompute + SP 34·s·b·h/t, full recompute 2·s·b·h/t.
``python tests/test_recompute.py`` prints the table shown in docs/engine.md.
"""
from __future__ import annotations

import functools
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hpcmega.config import ModelConfig
from hpcmega.parallel.fake_world import fake_mesh, fake_world
from hpcmega.parallel.memory import LiveTensorBytes, data_ptrs
from hpcmega.parallel.recompute import apply_recompute
from hpcmega.models import family_module
from hpcmega.models.common import build_model, cross_entropy, new_model
from hpcmega.planning.estimate import Shape, activation_bytes_per_layer

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
B, S, H = 2, 32, 64
FP32 = 4


class _Allocations(TorchDispatchMode):
    """Weak references to the storage of every tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out


def _block_forward(mode: str):
    """Run block 0 of a fresh model in ``mode``: (model, input, output, saved tensors, bytes kept alive)."""
    model = build_model(CFG, seed=0)
    apply_recompute(model, mode)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    allocations = _Allocations()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), allocations:
        y = model.blocks["0"](x)
    gc.collect()
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()} | {y.untyped_storage().data_ptr()}
    kept = sum(
        nbytes
        for ptr, (ref, nbytes) in allocations.storages.items()
        if ptr not in excluded and not ref.expired()
    )
    return model, x, y, saved, kept


def test_full_recompute_keeps_only_the_block_input():
    _, x, y, saved, kept = _block_forward("full")
    assert len(saved) == 1 and saved[0] is x, [tuple(t.shape) for t in saved]
    assert kept == 0, f"full recompute kept {kept} bytes besides the block input"
    y.sum().backward()  # and the recompute really runs
    assert x.grad is not None


def test_selective_keeps_less_than_none_and_more_than_full():
    *_, saved_none, kept_none = _block_forward("none")
    *_, _, kept_selective = _block_forward("selective")
    *_, _, kept_full = _block_forward("full")
    assert len(saved_none) > 10  # without recompute autograd saves every intermediate it needs
    # Selective drops the 4h-wide GELU output and both LayerNorm outputs, and keeps instead the results of the wo
    # and fc2 matmuls (which "none" never stores): at least 4h per token saved.
    dropped = (4 * H + 2 * H) * B * S * FP32
    added = 2 * H * B * S * FP32
    assert kept_none - kept_selective >= dropped - added, (kept_none, kept_selective)
    # ... but keeps the matmul and attention results, which full recompute drops too.
    assert kept_full < kept_selective < kept_none
    # The 4h-wide fc1 output is one of the results it keeps.
    assert kept_selective >= 4 * H * B * S * FP32


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gradients_are_identical(mode):
    tokens = torch.randint(0, CFG.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(2))

    def grads(recompute: str) -> dict[str, torch.Tensor]:
        model = build_model(CFG, seed=0)
        apply_recompute(model, recompute)
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    reference, got = grads("none"), grads(mode)
    assert reference.keys() == got.keys()
    for name in reference:
        assert torch.equal(reference[name], got[name]), f"{mode}: gradient of {name} changed"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="selective"):
        apply_recompute(build_model(CFG, seed=0), "some")


# -- tensor + sequence parallel, against Korthikanti et al. 2022 (Table 2) ------------------------------------------
TP_SIZES = (1, 2, 4, 8)
TP_B, TP_S, TP_H, TP_HEADS = 2, 64, 64, 8  # s divisible by t = 8 (sequence shards), heads by t
SBH = TP_S * TP_B * TP_H
BF16 = 2
PAPER = {"selective": 34, "full": 2}  # bf16 bytes per s·b·h/t and layer, with sequence parallelism
TOLERANCE = 1.15


# One block of each family; llama's 8 query heads share 2 kv heads (t = 2 splits them, t = 4 and 8 replicate them).
TP_MODELS = {
    "gpt2": ModelConfig(vocab_size=64, d_model=TP_H, n_layers=1, n_heads=TP_HEADS, max_seq_len=TP_S),
    "llama": ModelConfig(family="llama", vocab_size=64, d_model=TP_H, n_layers=1, n_heads=TP_HEADS, n_kv_heads=2,
                         ffn_hidden=3 * TP_H, max_seq_len=TP_S),
}


@functools.cache
def saved_bytes_per_block(t: int, mode: str, family: str = "gpt2", dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one rank of a t-way TP+SP group keeps for backward after the forward of one real block (bf16 unless
    said): its input shard plus every storage the forward created that is still alive (parameters and output
    excluded)."""
    with fake_world(t):
        mesh = fake_mesh(1, 1, t)
        with torch.device("meta"):
            model = new_model(TP_MODELS[family])
        model.keep_only(range(1), first=False, last=False)
        if t > 1:
            family_module(family, "parallelize").apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
        apply_recompute(model, mode)
        model.to_empty(device="cpu")
        model.to(dtype)
        block = model.blocks["0"]
        x = torch.randn(TP_B, TP_S // t, TP_H, dtype=dtype, requires_grad=True)  # the sequence shard
        tracker = LiveTensorBytes()
        with tracker:
            y = block(x)
        return tracker.alive(exclude=data_ptrs([*block.parameters(), y, x])) + x.untyped_storage().nbytes()


@pytest.mark.parametrize("t", TP_SIZES)
def test_recompute_under_tensor_and_sequence_parallel_matches_the_paper(t):
    none, selective, full = (saved_bytes_per_block(t, mode) for mode in ("none", "selective", "full"))
    assert selective < none, (t, selective, none)
    assert selective <= TOLERANCE * PAPER["selective"] * SBH / t, (t, selective / (SBH / t))
    assert full <= TOLERANCE * PAPER["full"] * SBH / t, (t, full / (SBH / t))
    assert full >= BF16 * SBH / t  # the block input shard is always kept


def test_selective_keeps_neither_all_gathers_nor_partial_sums():
    # Without the rule, t = 8 keeps the full-sequence all-gathered inputs of the column-parallel matmuls (s·b·h
    # each) and the row-parallel partial sums (s·b·h each): more than "none". With it the per-rank bytes fall as 1/t.
    assert saved_bytes_per_block(8, "selective") * 8 == saved_bytes_per_block(1, "selective")


def _planned_bytes(t: int, mode: str, dtype: torch.dtype) -> int:
    """What the planner (hpcmega.planning.estimate, hpcmega.planning.families) says the llama block keeps."""
    m = TP_MODELS["llama"]
    sh = Shape(vocab=m.vocab_size, h=m.d_model, layers=1, heads=m.n_heads, max_seq_len=m.max_seq_len, tp=t, pp=1,
               dp=1, v=1, schedule="1f1b", m=1, b=TP_B, s=TP_S, recompute=mode, sp=t > 1,
               precision="bf16" if dtype == torch.bfloat16 else "fp32", reshard_after_forward=True,
               family="llama", kv_heads=m.n_kv_heads, ffn=m.ffn_hidden)
    return activation_bytes_per_layer(sh)


@pytest.mark.parametrize("t", TP_SIZES)
def test_llama_block_keeps_what_the_accounting_says(t):
    """Per layer and rank, bf16, SP: selective keeps sbh/t x (10 + 4f/h + 4 kv_dim/h) + the fp32 log-sum-exp
    (4 s b n_heads/t), with replicated kv heads (t > n_kv_heads) 2 x 2 s b head_dim for k and v instead of their
    share; full keeps the 2 sbh/t input; none is the breakdown in hpcmega.planning.families. Exactly, at every t."""
    sbh = TP_S * TP_B * TP_H
    m = TP_MODELS["llama"]
    kv_dim, head_dim = m.n_kv_heads * m.head_dim, m.head_dim
    kv = 4 * kv_dim / TP_H * sbh / t if t <= m.n_kv_heads else 2 * 2 * TP_S * TP_B * head_dim
    korthikanti_style = (10 + 4 * m.ffn_hidden / TP_H) * sbh / t + kv + 4 * TP_S * TP_B * m.n_heads / t
    assert saved_bytes_per_block(t, "selective", "llama") == korthikanti_style
    assert saved_bytes_per_block(t, "full", "llama") == 2 * sbh / t
    for mode in ("none", "selective", "full"):
        assert saved_bytes_per_block(t, mode, "llama") == _planned_bytes(t, mode, torch.bfloat16), mode


@pytest.mark.parametrize("t", (1, 4))
def test_llama_fp32_bytes_match_the_planner(t):
    for mode in ("none", "selective"):
        assert saved_bytes_per_block(t, mode, "llama", torch.float32) == _planned_bytes(t, mode, torch.float32)


if __name__ == "__main__":
    print("| t | none | selective | full | paper selective+SP | paper full |")
    print("|---|---|---|---|---|---|")
    for t in TP_SIZES:
        row = [saved_bytes_per_block(t, m) / (SBH / t) for m in ("none", "selective", "full")]
        print(f"| {t} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {PAPER['selective']} | {PAPER['full']} |")
    print("llama (8 heads, 2 kv heads, f = 3h):")
    for t in TP_SIZES:
        row = [saved_bytes_per_block(t, m, "llama") / (SBH / t) for m in ("none", "selective", "full")]
        print(f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |")

"""Activation recompute keeps less for backward and changes no gradient.

Memory is measured two ways on the real model: autograd's saved tensors (``saved_tensors_hooks``), and the bytes
of every tensor produced during the forward that are still alive once it returns (storage weak references; this
also sees what selective recompute caches outside autograd's saved tensors). Parameters and the block output are
excluded: only what the block keeps *for backward* counts.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hpcmega.config import ModelConfig
from hpcmega.engine.recompute import apply_recompute
from hpcmega.model.gpt import build_model, cross_entropy

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

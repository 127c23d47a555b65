"""A deterministic synthetic token stream: every rank computes the same global batch from (seed, sample index).

Sample ``i`` depends only on (seed, i), so any layout, any DP degree and any resume point see the same data. The
sequences are learnable -- an arithmetic progression modulo the vocabulary with a per-sample start and stride, and
10% of tokens replaced by noise -- so the loss visibly falls in a demo, while staying far from trivially zero. The validation split draws its samples from (seed, "val", i): the same
kind of sequences, never the training ones.
"""
from __future__ import annotations

import zlib

import torch

from hpcmega.config import Config

NOISE = 0.1
MAX_STRIDE = 7


class SyntheticLoader:
    """``global_batch(step)`` holds samples ``step * global_batch ... + global_batch - 1``; state = next index."""

    def __init__(self, cfg: Config, split: str = "train") -> None:
        # The training stream keeps its original seeds "<seed>:<i>"; validation samples are "<seed>:val:<i>".
        self.stream = f"{cfg.train.seed}" if split == "train" else f"{cfg.train.seed}:{split}"
        self.batch_size = cfg.train.global_batch
        self.seq_len = cfg.train.seq_len
        self.vocab_size = cfg.model.vocab_size
        self.next_index = 0

    def sample(self, index: int) -> torch.Tensor:
        """Token ids of one sample, ``[seq_len + 1]`` (inputs and shifted targets)."""
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.stream}:{index}".encode()))
        n = self.seq_len + 1
        start = int(torch.randint(self.vocab_size, (), generator=gen))
        stride = int(torch.randint(1, MAX_STRIDE + 1, (), generator=gen))
        tokens = (start + stride * torch.arange(n)) % self.vocab_size
        noise = torch.rand(n, generator=gen) < NOISE
        return torch.where(noise, torch.randint(self.vocab_size, (n,), generator=gen), tokens)

    def local_batch(self, step: int, dp_rank: int, dp: int) -> torch.Tensor:
        """This DP rank's rows of the global batch of ``step``: ``LongTensor[global_batch / dp, seq_len + 1]``."""
        rows = self.batch_size // dp
        first = step * self.batch_size + dp_rank * rows
        self.next_index = (step + 1) * self.batch_size
        return torch.stack([self.sample(first + r) for r in range(rows)])

    def global_batch(self, step: int) -> torch.Tensor:
        """``LongTensor[global_batch, seq_len + 1]``, identical on every rank."""
        return self.local_batch(step, 0, 1)

    def state_dict(self) -> dict:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict) -> None:
        self.next_index = int(state["next_index"])

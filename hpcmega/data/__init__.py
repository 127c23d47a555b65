"""Training data: a synthetic stream (benchmarks, tests, models too small for GPT-2's tokens) or prepared token
shards (`hpcmega data prepare`, any tokenizer: docs/data.md).

Both loaders serve ``global_batch(step) -> LongTensor[global_batch, seq_len + 1]`` by global sample index, from
the training split or the held-out validation split (``split="val"``, for ``train.eval_every``), and
``local_batch(step, dp_rank, dp)``: the rows of it that DP rank ``dp_rank`` of ``dp`` trains on, read alone."""
from __future__ import annotations

from hpcmega.config import SYNTHETIC

SPLITS = ("train", "val")


def build_loader(cfg, split: str = "train"):
    if split not in SPLITS:
        raise ValueError(f"unknown data split {split!r}; one of {SPLITS}")
    if cfg.train.data == SYNTHETIC:
        from hpcmega.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, split)
    from hpcmega.data.loader import TokenShardLoader

    return TokenShardLoader(cfg, split=split)

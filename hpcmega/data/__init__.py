"""Training data: a synthetic stream (benchmarks, tests) or prepared GPT-2 token shards (`hpcmega data prepare`).

Both loaders serve ``global_batch(step) -> LongTensor[global_batch, seq_len + 1]`` by global sample index."""
from __future__ import annotations


def build_loader(cfg):
    if cfg.train.data == "synthetic":
        from hpcmega.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg)
    from hpcmega.data.loader import TokenShardLoader

    return TokenShardLoader(cfg)

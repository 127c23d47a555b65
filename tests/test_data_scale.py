"""Data at scale (issue 7, item 8): a DP rank reads only its rows, loader memory does not grow with the dataset,
and a remote shard is fetched once per node however many local ranks race for it."""
from __future__ import annotations

import multiprocessing as mp
import tracemalloc

import fsspec
import numpy as np
import pytest

from hpcmega.config import Config
from hpcmega.data.loader import KeyedPermutation, TokenShardLoader
from hpcmega.data.prepare import write_dataset

# No torch at module level: the remote-cache test's worker processes import this module, and should start fast.


def _cfg(data: str, seq_len: int = 64, batch: int = 8) -> Config:
    cfg = Config()
    cfg.model.vocab_size = 50304
    cfg.train.data, cfg.train.seq_len, cfg.train.global_batch, cfg.train.micro_batch = data, seq_len, batch, 1
    return cfg


def _dataset(path, tokens: int, shard_tokens: int, seed: int = 0) -> str:
    values = np.random.default_rng(seed).integers(0, 50257, tokens, dtype=np.uint16)
    write_dataset(fsspec.filesystem("file"), str(path), values, shard_tokens, val_fraction=0)
    return str(path)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_keyed_permutation_is_a_bijection(n):
    perm = KeyedPermutation(n, key=12345)
    assert sorted(perm(i) for i in range(n)) == list(range(n))
    if n > 10:
        assert [perm(i) for i in range(10)] != list(range(10))
        assert [perm(i) for i in range(10)] != [KeyedPermutation(n, key=6)(i) for i in range(10)]


@pytest.mark.parametrize("kind", ["shards", "synthetic"])
def test_local_batches_are_the_rows_of_the_global_batch(tmp_path, kind):
    import torch

    from hpcmega.data.synthetic import SyntheticLoader

    if kind == "shards":
        cfg = _cfg(_dataset(tmp_path / "ds", 20_000, 3_000))  # windows straddle shard boundaries
        make = lambda: TokenShardLoader(cfg)  # noqa: E731
    else:
        cfg = _cfg("synthetic")
        cfg.model.vocab_size = 256
        make = lambda: SyntheticLoader(cfg)  # noqa: E731
    full = make().global_batch(5)
    assert full.shape == (8, 65)
    for dp in (1, 2, 4, 8):
        parts = [make().local_batch(5, r, dp) for r in range(dp)]
        assert torch.equal(torch.cat(parts), full), dp
    loader = make()
    loader.local_batch(5, 1, 2)
    assert loader.state_dict() == {"next_index": 48}  # the next step's first global sample, whatever the rank


def test_epochs_visit_every_window_once_in_a_new_order(tmp_path):
    cfg = _cfg(_dataset(tmp_path / "ds", 65 * 40 + 1, 1000), batch=8)  # exactly 40 windows = 5 steps
    loader = TokenShardLoader(cfg)
    epoch0 = [loader._window(i) for i in range(40)]
    epoch1 = [loader._window(i) for i in range(40, 80)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1


def _peak_loader_bytes(data: str) -> int:
    tracemalloc.start()
    try:
        loader = TokenShardLoader(_cfg(data, seq_len=64, batch=16))
        for step in (0, 7, 1000):
            loader.local_batch(step, 1, 2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loader_memory_does_not_grow_with_the_dataset(tmp_path):
    small = _dataset(tmp_path / "small", 100_000, 50_000)  # 200 KB, 1.5k windows
    large = _dataset(tmp_path / "large", 8_000_000, 1_000_000, seed=1)  # 16 MB in 8 shards, 123k windows
    _peak_loader_bytes(small)  # warm-up: first-use imports and caches are not the loader's
    peak_small, peak_large = _peak_loader_bytes(small), _peak_loader_bytes(large)
    # a stored permutation of the windows alone would be ~1 MB, the shards read whole 16 MB
    assert peak_large < peak_small + 64 * 1024, (peak_small, peak_large)


def _read_through_cache(url: str, storage: dict, cache: str, barrier) -> tuple[list[str], list[int]]:
    """One "local rank": no torch here, so the processes start fast."""
    loader = TokenShardLoader(_cfg(url, batch=8), storage_options=storage, cache_dir=cache)
    barrier.wait()  # every rank asks for the shards at the same moment
    return loader.fetched, loader.read(0, loader.total_tokens).tolist()  # touches every shard


@pytest.mark.slow
def test_remote_shards_are_fetched_once_per_node(tmp_path, s3_endpoint):
    storage = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint,
                                                                  "region_name": "us-east-1"}}
    url = f"s3://ckpt/data-{tmp_path.name}"
    values = np.random.default_rng(3).integers(0, 50257, 30_000, dtype=np.uint16)
    write_dataset(fsspec.filesystem("s3", **storage), url, values, 10_000, val_fraction=0)
    cache = tmp_path / "node-cache"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            results = pool.starmap(_read_through_cache, [(url, storage, str(cache), barrier)] * 3)
    fetched = sorted(f for got, _ in results for f in got)
    assert fetched == ["shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]  # each once, by one rank
    assert all(tokens == values.tolist() for _, tokens in results)
    files = sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert files == fetched  # no partial downloads left behind
    direct = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in sorted(cache.rglob("shard-*.bin"))])
    assert np.array_equal(direct, values)

"""Training batches from prepared token shards (uint16 or uint32, as the index says), addressed by global sample index.

Sample ``i`` is a window of ``seq_len + 1`` tokens; windows are the non-overlapping chunks of the token stream (the
shards in order, a window may straddle two), visited in a seeded pseudo-random order that is reshuffled each epoch.
The global batch of step ``s`` is samples ``[s*B, (s+1)*B)`` -- the same whatever the layout; a DP rank reads only
its own rows of it (``local_batch``). The loader's state is only the next sample index, so a checkpoint written with
one layout resumes in another. ``split="val"`` reads the held-out ``val_shards`` the same way.

Memory per rank does not grow with the dataset: shards are memory-mapped (only the pages of the rows a rank reads
are touched, and the OS shares them between the ranks of a node), and the epoch order is a keyed bijection on the
window indices computed per sample (a Feistel network with cycle walking) instead of a stored permutation. A shard
on a remote filesystem (s3://, gs://, ...) is fetched once per node into a local cache directory: the first local
rank to need it downloads it under an exclusive file lock and renames it into place, the others wait on the lock
and map the finished file.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from hpcmega.config import Config
from hpcmega.data.index import DataError, open_shard, read_index, vocab_fix

_MASK64 = (1 << 64) - 1
_ROUNDS = 4


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap 64-bit hash with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class KeyedPermutation:
    """A bijection of ``range(n)`` chosen by ``key``, evaluated one index at a time in O(1) memory."""

    def __init__(self, n: int, key: int) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2 * half bits cover range(n)
        self.keys = [_mix(key * _ROUNDS + r) for r in range(_ROUNDS)]

    def _feistel(self, x: int) -> int:
        mask = (1 << self.half) - 1
        left, right = x >> self.half, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        x = self._feistel(i)
        while x >= self.n:  # cycle walking: fewer than 4 steps expected, since 4^half < 4n
            x = self._feistel(x)
        return x


def default_cache_dir() -> str:
    """Node-local cache for remote shards: $HPCMEGA_DATA_CACHE, else <tmp>/hpcmega-data-cache."""
    return os.environ.get("HPCMEGA_DATA_CACHE") or os.path.join(tempfile.gettempdir(), "hpcmega-data-cache")


def fetch_once(fs, remote: str, local: Path) -> bool:
    """Make ``local`` a complete copy of ``remote``; True if this process downloaded it. Safe when several
    processes race: one downloads under an exclusive lock to a temporary name and renames it into place (atomic),
    the others block on the lock and then find the file."""
    if local.exists():
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.with_name(local.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if local.exists():
            return False
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        fs.get_file(remote, str(tmp))
        os.replace(tmp, local)
    return True


class TokenShardLoader:
    def __init__(self, cfg: Config, storage_options: dict | None = None, split: str = "train",
                 cache_dir: str | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        url = cfg.train.data
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.index = read_index(self.fs, self.root, url)
        self.vocab_size = self.index["vocab_size"]
        if self.vocab_size > cfg.model.vocab_size:
            raise vocab_fix(self.vocab_size, cfg.model.vocab_size)
        shards = self.index.get("shards" if split == "train" else f"{split}_shards")
        if not shards:
            raise DataError(f"{url} has no {split} split (prepared without one); run `hpcmega data prepare "
                            f"--source {self.index.get('source', 'SOURCE')} --out {url} --force` or drop --eval-every")
        self.local = isinstance(self.fs, LocalFileSystem)
        # remote shards of one dataset share a cache folder named after its URL and index (a re-prepared dataset
        # under the same URL gets a new folder)
        digest = hashlib.sha256(url.encode() + json.dumps(shards).encode()).hexdigest()[:16]
        self.cache = Path(cache_dir or default_cache_dir()) / digest
        self.fetched: list[str] = []  # shards this process downloaded (the others found them in the cache)
        self.shards = shards
        self.shard_files = [s["file"] for s in shards]
        self.offsets = np.cumsum([0] + [int(s["tokens"]) for s in shards])
        self.total_tokens = int(self.offsets[-1])
        self._maps: dict[int, np.ndarray] = {}
        self.seq_len, self.batch, self.seed = cfg.train.seq_len, cfg.train.global_batch, cfg.train.seed
        self.windows = (self.total_tokens - 1) // (self.seq_len + 1)
        if self.windows < 1:
            raise DataError(f"the {split} split of {url} has {self.total_tokens} tokens, fewer than one sequence of "
                              f"{self.seq_len + 1}; lower --seq-len or prepare more data (or a larger --val-fraction)")
        self.next_index = 0
        self._epoch, self._order = -1, None

    # -- shards --------------------------------------------------------------------------------------------------
    def _shard(self, k: int) -> np.ndarray:
        """Shard ``k`` as a read-only memory map (fetched into the node's cache first if remote), checked against
        the index when first opened (hpcmega.data.index.open_shard)."""
        if k not in self._maps:
            path = self.root + "/" + self.shard_files[k]
            if not self.local:
                local = self.cache / self.shard_files[k]
                if fetch_once(self.fs, path, local):
                    self.fetched.append(self.shard_files[k])
                path = str(local)
            self._maps[k] = open_shard(path, self.shards[k], self.index["dtype"], self.vocab_size)
        return self._maps[k]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the whole stream (across shard boundaries), as a new int64 array."""
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - int(self.offsets[k])
            n = min(stop, int(self.offsets[k + 1])) - pos
            out[pos - start: pos - start + n] = self._shard(k)[lo: lo + n]
            pos += n
            k += 1
        return out

    # -- samples -------------------------------------------------------------------------------------------------
    def _window(self, i: int) -> int:
        epoch, pos = divmod(i, self.windows)
        if epoch != self._epoch:
            self._order = KeyedPermutation(self.windows, _mix(self.seed) ^ epoch)
            self._epoch = epoch
        return self._order(pos)

    def sample(self, i: int):
        import torch

        start = self._window(i) * (self.seq_len + 1)
        return torch.from_numpy(self.read(start, start + self.seq_len + 1))

    def local_batch(self, step: int, dp_rank: int, dp: int):
        """This DP rank's rows of the global batch of ``step``: ``[B/dp, seq_len + 1]``; reads only those rows."""
        import torch

        rows = self.batch // dp
        first = step * self.batch + dp_rank * rows
        self.next_index = (step + 1) * self.batch
        return torch.stack([self.sample(first + k) for k in range(rows)])

    def global_batch(self, step: int):
        """The whole global batch of ``step`` (every rank's rows): ``local_batch`` with one DP rank."""
        return self.local_batch(step, 0, 1)

    def state_dict(self) -> dict:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict) -> None:
        self.next_index = int(state["next_index"])

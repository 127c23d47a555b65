"""Training batches from prepared token shards, addressed by global sample index.

Sample ``i`` is a window of ``seq_len + 1`` tokens; windows are the non-overlapping chunks of the token stream,
visited in a seeded random order that is reshuffled each epoch. The global batch of step ``s`` is samples
``[s*B, (s+1)*B)`` -- the same on every rank whatever the layout; each DP rank takes its rows. The loader's
state is only the next sample index, so a checkpoint written with one layout resumes in another. ``split="val"``
reads the held-out ``val_shards`` the same way.
"""
from __future__ import annotations

import json

import numpy as np

from hpcmega.config import Config, ConfigError
from hpcmega.data.prepare import INDEX


class TokenShardLoader:
    def __init__(self, cfg: Config, storage_options: dict | None = None, split: str = "train") -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        url = cfg.train.data
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        index_path = root.rstrip("/") + "/" + INDEX
        if not fs.exists(index_path):
            raise ConfigError(f"{url} holds no prepared dataset ({INDEX} missing); run "
                              f"`hpcmega data prepare --source shakespeare --out {url}` or use --data synthetic")
        self.index = json.loads(fs.cat_file(index_path))
        self.vocab_size = int(self.index["vocab_size"])
        if self.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the data's vocabulary has {self.vocab_size} tokens but model.vocab_size="
                              f"{cfg.model.vocab_size}; use --vocab-size 50304")
        shards = self.index.get("shards" if split == "train" else f"{split}_shards")
        if not shards:
            raise ConfigError(f"{url} has no {split} split (prepared without one); run `hpcmega data prepare "
                              f"--source {self.index.get('source', 'SOURCE')} --out {url} --force` or drop --eval-every")
        parts = []
        for shard in shards:
            path = root.rstrip("/") + "/" + shard["file"]
            if isinstance(fs, LocalFileSystem):  # memory-map: no copy, pages shared by the ranks of a node
                parts.append(np.memmap(path, dtype=np.uint16, mode="r"))
            else:
                parts.append(np.frombuffer(fs.cat_file(path), dtype=np.uint16))
        self.tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.seq_len, self.batch, self.seed = cfg.train.seq_len, cfg.train.global_batch, cfg.train.seed
        self.windows = (len(self.tokens) - 1) // (self.seq_len + 1)
        if self.windows < 1:
            raise ConfigError(f"the {split} split of {url} has {len(self.tokens)} tokens, fewer than one sequence of "
                              f"{self.seq_len + 1}; lower --seq-len or prepare more data (or a larger --val-fraction)")
        self.next_index = 0
        self._epoch, self._order = -1, None

    def _window(self, i: int) -> int:
        epoch, pos = divmod(i, self.windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._epoch = epoch
        return int(self._order[pos])

    def sample(self, i: int):
        import torch

        start = self._window(i) * (self.seq_len + 1)
        return torch.from_numpy(self.tokens[start: start + self.seq_len + 1].astype(np.int64))

    def global_batch(self, step: int):
        import torch

        first = step * self.batch
        self.next_index = first + self.batch
        return torch.stack([self.sample(first + k) for k in range(self.batch)])

    def state_dict(self) -> dict:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict) -> None:
        self.next_index = int(state["next_index"])

"""A prepared dataset's ``index.json``: read, checked before anything is written, and each shard checked against it.

Nothing trains on garbage: the pre-flight (``check_dataset``, on the login node, before a run folder exists)
refuses an index whose fields are missing or of the wrong type, shards that are missing or whose size differs from
the index, a vocabulary larger than the model's, a split shorter than one sequence, and ``--eval-every`` without a
validation split -- one line each, naming the fix. On the ranks, a shard is checked when first opened
(``open_shard``): its size, its sha256 against the index, and that every id is inside the vocabulary (one pass
over the bytes, ~35 ms for a 10M-token shard: docs/data.md), so a damaged or replaced shard stops the run with one
line naming the shard before a step is taken on it.

numpy is imported where it is used: `hpcmega --help` reads this module's constants.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING

from hpcmega.config import SYNTHETIC
from hpcmega.data.tokenizer import Tokenizer, dataset_tokenizer, load_tokenizer
from hpcmega.errors import ConfigError

if TYPE_CHECKING:  # numpy is imported where shards are opened, not at import time
    import numpy as np

INDEX = "index.json"
DTYPES = ("uint16", "uint32")
_SHARD_NAME = re.compile(r"[A-Za-z0-9._-]+\.bin")
_HEX64 = re.compile(r"[0-9a-f]{64}")
HASH_BLOCK = 1 << 20  # tokens hashed and range-checked at once


class DataError(ConfigError):
    """Data that cannot be used (bad input to prepare, a damaged dataset): one line, exit 2."""


def vocab_fix(data_vocab: int, model_vocab: int) -> DataError:
    """The data's vocabulary does not fit the model's embedding."""
    return DataError(f"the data's vocabulary has {data_vocab} tokens but model.vocab_size={model_vocab}; use "
                     f"--vocab-size {data_vocab} or more (a multiple of 64 such as {-(-data_vocab // 64) * 64} keeps "
                     "the embedding's matmuls aligned)")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def read_index(fs, root: str, url: str) -> dict:
    """The index of the dataset at ``url`` with its fields checked (see ``check_fields``)."""
    path = _join(root, INDEX)
    if not fs.exists(path):
        raise DataError(f"--data {url}: no prepared dataset there ({INDEX} missing); run `hpcmega data prepare "
                        f"--source shakespeare --out {url}` or use --data synthetic")
    try:
        index = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError):
        index = None
    if not isinstance(index, dict):
        raise DataError(f"--data {url}: {INDEX} is not a JSON object; prepare the data again with "
                        f"`hpcmega data prepare --out {url} --force`")
    check_fields(index, url)
    return index


def _bad(url: str, what: str) -> DataError:
    return DataError(f"--data {url}: {INDEX} {what}; prepare the data again with `hpcmega data prepare --out {url} "
                     "--force`")


def _count(value, url: str, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(url, f"has {what}={value!r}, not a whole number >= {minimum}")
    return value


def check_fields(index: dict, url: str) -> None:
    """Every field the loader uses has the right type (an index written before ``dtype`` existed is uint16)."""
    import numpy as np

    vocab = _count(index.get("vocab_size"), url, "vocab_size", 1)
    index.setdefault("dtype", "uint16")
    if index["dtype"] not in DTYPES:
        raise _bad(url, f"has dtype={index['dtype']!r}, not one of {', '.join(DTYPES)}")
    if np.iinfo(index["dtype"]).max + 1 < vocab:
        raise _bad(url, f"stores {vocab} token ids as {index['dtype']}, which cannot hold them")
    for key in ("shards", "val_shards"):
        shards = index.get(key, [])
        if not isinstance(shards, list):
            raise _bad(url, f"has {key} that is not a list")
        for s in shards:
            if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _SHARD_NAME.fullmatch(s["file"]):
                raise _bad(url, f"lists a {key} entry without a plain shard file name: {s!r}"[:200])
            _count(s.get("tokens"), url, f"tokens of {s['file']}")
            if "sha256" in s and not (isinstance(s["sha256"], str) and _HEX64.fullmatch(s["sha256"])):
                raise _bad(url, f"has a malformed sha256 for {s['file']}")


def split_tokens(index: dict, split: str) -> int:
    return sum(s["tokens"] for s in index.get("shards" if split == "train" else f"{split}_shards", []))


def check_dataset(url: str, fs, root: str, model_vocab: int, seq_len: int, eval_every: int) -> dict:
    """The pre-flight of a run on prepared data: fields, vocabulary, splits long enough, every shard present with
    the size the index gives (one listing of the folder, no shard read)."""
    index = read_index(fs, root, url)
    if index["vocab_size"] > model_vocab:
        raise vocab_fix(index["vocab_size"], model_vocab)
    for split in ("train", "val") if eval_every else ("train",):
        if split == "val" and not index.get("val_shards"):
            raise DataError(f"--data {url} has no val split (prepared without one); prepare it again with "
                            f"--val-fraction 0.01 (`hpcmega data prepare --out {url} --force`) or drop --eval-every")
        tokens = split_tokens(index, split)
        if (tokens - 1) // (seq_len + 1) < 1:
            raise DataError(f"the {split} split of {url} has {tokens} tokens, fewer than one sequence of "
                            f"{seq_len + 1}; lower --seq-len or prepare more data (or a larger --val-fraction)")
    import numpy as np

    sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p.get("size") for p in fs.ls(root, detail=True)}
    itemsize = np.dtype(index["dtype"]).itemsize
    for s in index.get("shards", []) + index.get("val_shards", []):
        if s["file"] not in sizes:
            raise DataError(f"--data {url}: shard {s['file']} listed in {INDEX} is missing; prepare the data again "
                            f"with `hpcmega data prepare --out {url} --force`")
        if sizes[s["file"]] != s["tokens"] * itemsize:
            raise DataError(f"--data {url}: shard {s['file']} has {sizes[s['file']]} bytes, the index says "
                            f"{s['tokens'] * itemsize} ({s['tokens']} {index['dtype']} tokens); prepare the data "
                            "again with `hpcmega data prepare --force`")
    return index


def open_shard(path: str, entry: dict, dtype: str, vocab_size: int) -> np.ndarray:
    """Shard ``path`` memory-mapped, after checking it against its index entry: its size, its sha256 (when the
    index has one) and every id < ``vocab_size``. DataError naming the shard otherwise."""
    import numpy as np

    fix = "prepare the data again with `hpcmega data prepare --force`"
    size, expected = os.path.getsize(path), entry["tokens"] * np.dtype(dtype).itemsize
    if size != expected:
        raise DataError(f"data shard {path} has {size} bytes, the index says {expected} ({entry['tokens']} {dtype} "
                        f"tokens); {fix}")
    ids = np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype)
    digest, top = hashlib.sha256(), 0
    for lo in range(0, len(ids), HASH_BLOCK):
        block = np.asarray(ids[lo: lo + HASH_BLOCK])
        digest.update(block)  # the mapped bytes themselves, no copy
        top = max(top, int(block.max()))
    if "sha256" in entry and digest.hexdigest() != entry["sha256"]:
        raise DataError(f"data shard {path} does not match its sha256 in {INDEX} (damaged or replaced); {fix}")
    if top >= vocab_size:
        raise DataError(f"data shard {path} holds token id {top}, beyond the vocabulary of {vocab_size} ids; {fix}")
    return ids


def data_tokenizer(url: str) -> Tokenizer:
    """The tokenizer the dataset at ``url`` was prepared with (what `sample` decodes a run's model with); GPT-2's
    for synthetic data, or when the dataset is no longer there."""
    import fsspec

    if url == SYNTHETIC:
        return load_tokenizer("gpt2")
    try:
        fs, root = fsspec.core.url_to_fs(url)
        return dataset_tokenizer(read_index(fs, root, url))
    except (DataError, OSError, ValueError, ImportError):
        return load_tokenizer("gpt2")

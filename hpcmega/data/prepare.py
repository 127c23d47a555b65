"""`hpcmega data prepare`: a corpus -> token shards (uint16, or uint32 above 65,536 ids) + ``index.json``.

Two phases, both restartable, neither holding more than a bounded batch of the corpus in memory:

1. **Tokenize** -- the inputs are cut into pieces (hpcmega.data.sources: fixed by the inputs alone), and a pool of
   ``workers`` processes turns each piece into one *part* file of token ids (every document followed by the
   tokenizer's end-of-text id) under ``OUT/.prepare/parts/``; a part's ``.json`` (its counts) is written after its
   tokens and marks it done. A prepare killed mid-way and run again with the same arguments keeps the done parts
   (``plan.json`` records what they were made from; another source or tokenizer starts over). On SLURM, each node
   takes every N-th piece (``run_task``), then one final step assembles (``finish``).
2. **Assemble** -- the parts, in piece order, are copied into fixed-size shards (``shard-*.bin``; the last
   ``val_fraction`` of the stream into ``val-*.bin``), each with its sha256, and ``index.json`` is written last: it
   is the commit marker (a folder without it is never read). Then the work folder is removed.

The output depends only on the inputs, the tokenizer and the sizes -- not on the number of workers or nodes, nor on
interruptions: byte-identical shards and index.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from hpcmega.errors import ConfigError
from hpcmega.data.progress import Progress
from hpcmega.data.index import INDEX, DataError
from hpcmega.data.sources import PIECE_BYTES, Input, Piece, Reader, find_inputs, plan_pieces
from hpcmega.data.tokenizer import Tokenizer, load_tokenizer

WORK = ".prepare"
VAL_FRACTION = 0.01  # default share of the tokens held out for validation (the end of the stream)
COPY_BLOCK = 8 << 20  # bytes copied at once from a part into the shards
FORMAT = 2


MIN_WORKER_BYTES = 8 << 20  # a worker process costs ~1 s to start (imports, the tokenizer): not for less input


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(todo_bytes: int) -> int:
    """The cores this process may use, but no more processes than the input keeps busy."""
    return max(1, min(usable_cores(), todo_bytes // MIN_WORKER_BYTES))


def _join(root: str, *names: str) -> str:
    return "/".join([root.rstrip("/"), *names])


# -- phase 1: pieces -> parts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PieceTask:
    """Everything a worker process needs for one piece (pickled to it)."""
    out: str
    storage: dict
    number: int
    input: Input
    piece: Piece
    tokenizer: str
    dtype: str
    text_field: str
    strict: bool
    weight: int  # input bytes this piece stands for (progress, MB/s)


def part_path(root: str, number: int, ext: str) -> str:
    return _join(root, WORK, "parts", f"{number:06d}.{ext}")


def tokenize_piece(task: PieceTask) -> dict:
    """Tokenize one piece into its part file; -> its counts (also written as the part's .json, last)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(task.out, **task.storage)
    tok = load_tokenizer(task.tokenizer)
    reader = Reader(task.input, task.piece, task.text_field, task.strict, task.storage)
    docs = tokens = text = 0
    tmp = part_path(root, task.number, f"bin.tmp-{os.getpid()}")
    with fs.open(tmp, "wb") as f:
        for texts in reader.batches():
            ids = tok.encode_batch(texts)
            flat: list[int] = []
            for doc in ids:
                flat.extend(doc)
                if reader.line_documents:
                    flat.append(tok.eot_id)
            text += sum(not t.isspace() for t in texts)
            docs += len(texts) if reader.line_documents else 0
            tokens += len(flat)
            f.write(np.asarray(flat, dtype=task.dtype).tobytes())
        if reader.ends_document and not reader.line_documents:
            f.write(np.asarray([tok.eot_id], dtype=task.dtype).tobytes())
            tokens, docs = tokens + 1, 1
    fs.mv(tmp, part_path(root, task.number, "bin"))
    stats = {"piece": task.number, "documents": docs, "text": text, "tokens": tokens, "bytes": task.weight,
             "bad": dict(reader.bad)}
    _write_atomic(fs, part_path(root, task.number, "json"), json.dumps(stats).encode())
    return stats


def _write_atomic(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


# -- the plan (what the parts are made from) ---------------------------------------------------------------------
def make_plan(source: str, tok: Tokenizer, text_field: str, strict: bool, piece_bytes: int, shard_tokens: int,
              val_fraction: float, storage: dict | None) -> dict:
    inputs = find_inputs(source, storage)
    pieces = plan_pieces(inputs, piece_bytes, storage)
    return {"version": FORMAT, "source": source, "tokenizer": tok.describe(), "text_field": text_field,
            "strict": strict, "piece_bytes": piece_bytes, "inputs": [dataclasses.asdict(i) for i in inputs],
            "pieces": [[p.input, p.start, p.stop] for p in pieces],
            "shard_tokens": shard_tokens, "val_fraction": val_fraction}


_PARTS_KEY = ("version", "source", "tokenizer", "text_field", "strict", "piece_bytes", "inputs", "pieces")


def start_work(fs, root: str, plan: dict) -> int:
    """Write ``plan`` into the work folder, keeping the done parts of an interrupted prepare of the same plan;
    -> how many were kept."""
    path = _join(root, WORK, "plan.json")
    old = None
    if fs.exists(path):
        try:
            old = json.loads(fs.cat_file(path))
        except ValueError:
            old = None
    if old is None or any(old.get(k) != plan[k] for k in _PARTS_KEY):
        if fs.exists(_join(root, WORK)):
            fs.rm(_join(root, WORK), recursive=True)
        fs.makedirs(_join(root, WORK, "parts"), exist_ok=True)
    _write_atomic(fs, path, json.dumps(plan, indent=1).encode())
    return len(done_parts(fs, root))


def read_plan(fs, root: str) -> dict:
    return json.loads(fs.cat_file(_join(root, WORK, "plan.json")))


def done_parts(fs, root: str) -> dict[int, dict]:
    """The counts of every done part, by piece number."""
    found = {}
    for path in fs.glob(_join(root, WORK, "parts", "*.json")):
        try:
            stats = json.loads(fs.cat_file(path))
        except (ValueError, OSError):
            continue
        found[int(stats["piece"])] = stats
    return found


def piece_tasks(out: str, storage: dict | None, plan: dict) -> list[PieceTask]:
    inputs = [Input(**i) for i in plan["inputs"]]
    tok = plan["tokenizer"]
    groups = Counter(i for i, _, _ in plan["pieces"])
    return [PieceTask(out, storage or {}, n, inputs[i], Piece(i, a, b), tok["tokenizer_path"], tok["dtype"],
                      plan["text_field"], plan["strict"], _weight(inputs[i], Piece(i, a, b), groups[i]))
            for n, (i, a, b) in enumerate(plan["pieces"])]


def _weight(inp: Input, piece: Piece, pieces_of_input: int) -> int:
    if piece.stop < 0 or inp.fmt == ".parquet":  # a whole compressed file, or a row group's share of the file
        return inp.size // pieces_of_input
    return piece.stop - piece.start


def run_pieces(tasks: list[PieceTask], workers: int, progress: Progress | None = None) -> None:
    """Tokenize ``tasks`` with ``workers`` processes (in this process for one), in any order: each part has its
    own file, so the order of completion does not matter."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            stats = tokenize_piece(task)
            if progress:
                progress.update(stats)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        for stats in pool.imap_unordered(tokenize_piece, tasks):
            if progress:
                progress.update(stats)


def run_task(out: str, task: int, ntasks: int, workers: int = 0, storage: dict | None = None) -> dict:
    """One node of a multi-node prepare: the not yet done pieces ``k`` with ``k % ntasks == task``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **(storage or {}))
    plan, done = read_plan(fs, root), done_parts(fs, root)
    mine = [t for t in piece_tasks(out, storage, plan) if t.number % ntasks == task and t.number not in done]
    progress = Progress(sum(t.weight for t in mine), label=f"task {task}/{ntasks}")
    run_pieces(mine, workers or default_workers(sum(t.weight for t in mine)), progress)
    progress.close()
    return {"task": task, "pieces": len(mine)}


# SLURM entry points (hpcmega.cluster.slurm.submit calls entry(cfg_dict, run_dir)): the job's run folder is
# OUT/JOB_FOLDER, so the dataset is its parent.
JOB_FOLDER = "prepare-job"


def tokenize_entry(cfg: dict, run_dir: str) -> dict:
    """Every task of the tokenizing job: its share of the pieces, with the cores SLURM gave it."""
    task, ntasks = int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))
    return run_task(os.path.dirname(os.path.abspath(run_dir)), task, ntasks)


def finish_entry(cfg: dict, run_dir: str) -> dict:
    """The final job: shards and index from every task's parts."""
    index = finish(os.path.dirname(os.path.abspath(run_dir)))
    return {"documents": index["documents"], "tokens": index["tokens"], "val_tokens": index["val_tokens"]}


# -- phase 2: parts -> shards + index ----------------------------------------------------------------------------
class ShardWriter:
    """Appends token ids to fixed-size shards ``<prefix>-NNNNN.bin``, hashing each as it is written."""

    def __init__(self, fs, root: str, dtype: str, shard_tokens: int) -> None:
        self.fs, self.root, self.dtype, self.shard_tokens = fs, root, np.dtype(dtype), shard_tokens
        self.done: dict[str, list[dict]] = {}
        self.prefix, self.file, self.count, self.hash = "shard", None, 0, None

    def switch(self, prefix: str) -> None:
        self._close()
        self.prefix = prefix

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                name = f"{self.prefix}-{len(self.done.setdefault(self.prefix, [])):05d}.bin"
                self.file, self.count, self.hash = self.fs.open(_join(self.root, name), "wb"), 0, hashlib.sha256()
                self.name = name
            n = min(len(ids), self.shard_tokens - self.count)
            data = ids[:n].tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.count += n
            ids = ids[n:]
            if self.count == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.done.setdefault(self.prefix, []).append(
                {"file": self.name, "tokens": self.count, "sha256": self.hash.hexdigest()})
            self.file = None

    def close(self) -> dict[str, list[dict]]:
        self._close()
        return self.done


def write_index(fs, root: str, index: dict) -> None:
    """Remove shard files of an older dataset that the new index does not list, then write ``index.json`` (the
    commit marker: last, and atomically)."""
    listed = {s["file"] for s in index["shards"] + index["val_shards"]}
    for path in fs.glob(_join(root, "*.bin")):
        if os.path.basename(path).startswith(("shard-", "val-")) and os.path.basename(path) not in listed:
            fs.rm(path)
    _write_atomic(fs, _join(root, INDEX), json.dumps(index, indent=1).encode())


def finish(out: str, storage: dict | None = None) -> dict:
    """Assemble the done parts into shards and write the index (the last step, also of a multi-node prepare)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **(storage or {}))
    plan, done = read_plan(fs, root), done_parts(fs, root)
    missing = [n for n in range(len(plan["pieces"])) if n not in done]
    if missing:
        raise DataError(f"{out}: {len(missing)} of {len(plan['pieces'])} pieces are not tokenized yet (first: "
                        f"{missing[0]}); run the same `hpcmega data prepare` again to finish them")
    stats = [done[n] for n in range(len(plan["pieces"]))]
    if not any(s["text"] for s in stats):
        raise DataError(f"--source {plan['source']!r} holds no text (only empty or blank documents or bad rows); "
                        "give files with text")
    total = sum(s["tokens"] for s in stats)
    split = total - int(total * plan["val_fraction"])
    tok = plan["tokenizer"]
    writer, pos = ShardWriter(fs, root, tok["dtype"], plan["shard_tokens"]), 0
    itemsize = np.dtype(tok["dtype"]).itemsize
    for n in range(len(stats)):
        with fs.open(part_path(root, n, "bin"), "rb") as f:
            while block := f.read(COPY_BLOCK - COPY_BLOCK % itemsize):
                ids = np.frombuffer(block, dtype=tok["dtype"])
                if pos < split <= pos + len(ids):
                    writer.write(ids[:split - pos])
                    writer.switch("val")
                    ids = ids[split - pos:]
                    pos = split
                writer.write(ids)
                pos += len(ids)
    if split == total:
        writer.switch("val")
    shards = writer.close()
    bad = sum((Counter(s["bad"]) for s in stats), Counter())
    index = {"format": FORMAT, **tok, "source": plan["source"], "text_field": plan["text_field"],
             "documents": sum(s["documents"] for s in stats), "bad_rows": dict(sorted(bad.items())),
             "tokens": split, "shards": shards.get("shard", []),
             "val_tokens": total - split, "val_shards": shards.get("val", []),
             "inputs": _input_summary(plan, stats)}
    write_index(fs, root, index)
    fs.rm(_join(root, WORK), recursive=True)
    return index


def _input_summary(plan: dict, stats: list[dict]) -> list[dict]:
    per: dict[int, dict] = {}
    for (i, _, _), s in zip(plan["pieces"], stats):
        entry = per.setdefault(i, {"name": os.path.basename(plan["inputs"][i]["url"]), "documents": 0, "tokens": 0})
        entry["documents"] += s["documents"]
        entry["tokens"] += s["tokens"]
    return [per[i] for i in sorted(per)]


# -- the whole prepare, on this machine --------------------------------------------------------------------------
def begin(source: str, out: str, shard_tokens: int = 10_000_000, force: bool = False,
          storage_options: dict | None = None, val_fraction: float = VAL_FRACTION, tokenizer: str = "gpt2",
          text_field: str = "text", strict: bool = False, piece_bytes: int = PIECE_BYTES) -> tuple[dict, int, bool]:
    """Check the arguments and inputs (ConfigError before anything is written), then write the plan into the work
    folder; -> (plan, parts kept from an interrupted run, whether this call created ``out``)."""
    import fsspec

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction} must be in [0, 1); e.g. 0.01")
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    if fs.exists(_join(root, INDEX)) and not force:
        raise ConfigError(f"{out} already holds a prepared dataset; pass --force to overwrite it")
    plan = make_plan(source, load_tokenizer(tokenizer), text_field, strict, piece_bytes, shard_tokens, val_fraction,
                     storage_options)
    if not any(i["size"] for i in plan["inputs"]):
        raise ConfigError(f"--source {source!r} holds no text (only empty files); give files with text")
    created = not fs.exists(root)
    if fs.exists(_join(root, INDEX)):
        fs.rm(_join(root, INDEX))  # --force: the old dataset stops being readable before it is overwritten
    return plan, start_work(fs, root, plan), created


def prepare(source: str, out: str, shard_tokens: int = 10_000_000, force: bool = False,
            storage_options: dict | None = None, val_fraction: float = VAL_FRACTION, tokenizer: str = "gpt2",
            text_field: str = "text", workers: int = 0, strict: bool = False, piece_bytes: int = PIECE_BYTES,
            progress: bool = False) -> dict:
    """Tokenize ``source`` into a dataset at ``out`` on this machine; -> its index plus ``seconds``, ``pieces`` and
    ``resumed`` (parts kept from an interrupted run). Bad input raises ConfigError before anything is written, or
    (found while tokenizing: an empty corpus, a bad row with ``strict``) removes what this run wrote."""
    import fsspec

    start = time.perf_counter()
    plan, resumed, created = begin(source, out, shard_tokens, force, storage_options, val_fraction, tokenizer,
                                   text_field, strict, piece_bytes)
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    tasks = piece_tasks(out, storage_options, plan)
    done = done_parts(fs, root)
    todo = [t for t in tasks if t.number not in done]
    bar = Progress(sum(t.weight for t in tasks), enabled=progress,
                   done_bytes=sum(t.weight for t in tasks if t.number in done))
    if "memory" in fs.protocol:
        workers = 1  # memory:// lives in this process only: worker processes would write elsewhere
    try:
        run_pieces(todo, workers or default_workers(sum(t.weight for t in todo)), bar)
        index = finish(out, storage_options)
    except DataError:
        _remove_work(fs, root, created)
        raise
    finally:
        bar.close()
    return {**index, "seconds": time.perf_counter() - start, "resumed": resumed, "pieces": len(tasks)}


def _remove_work(fs, root: str, created: bool) -> None:
    if fs.exists(_join(root, WORK)):
        fs.rm(_join(root, WORK), recursive=True)
    if created and fs.exists(root) and not fs.ls(root):
        fs.rm(root, recursive=True)


def write_dataset(fs, root: str, tokens: np.ndarray, shard_tokens: int, val_fraction: float = VAL_FRACTION,
                  extra: dict | None = None, tokenizer: Tokenizer | None = None) -> dict:
    """Token ids already in memory (tests, benchmarks) -> shards and, last, ``index.json``, as `prepare` writes
    them."""
    tok = (tokenizer or load_tokenizer("gpt2")).describe()
    split = len(tokens) - int(len(tokens) * val_fraction)
    fs.makedirs(root, exist_ok=True)
    writer = ShardWriter(fs, root, tok["dtype"], shard_tokens)
    writer.write(np.asarray(tokens[:split], dtype=tok["dtype"]))
    writer.switch("val")
    writer.write(np.asarray(tokens[split:], dtype=tok["dtype"]))
    shards = writer.close()
    index = {"format": FORMAT, **tok, "documents": 0, "tokens": split, "shards": shards.get("shard", []),
             "val_tokens": len(tokens) - split, "val_shards": shards.get("val", []), **(extra or {})}
    write_index(fs, root, index)
    return index

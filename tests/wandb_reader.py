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


def read_run(wandb_file: Path) -> dict:
    """-> {"run_id", "group", "tags", "config", "resume_from"...}: the run record and every config update, as wandb
    wrote them (config values decoded from JSON; later updates win)."""
    from wandb.proto import wandb_internal_pb2

    out: dict = {"config": {}}
    for payload in _payloads(Path(wandb_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(run_id=run.run_id, group=run.run_group, tags=list(run.tags))
            updates = run.config.update
        elif kind == "config":
            updates = record.config.update
        else:
            continue
        for item in updates:
            value = json.loads(item.value_json)
            out["config"][item.key or "/".join(item.nested_key)] = value.get("value", value) \
                if isinstance(value, dict) and set(value) <= {"value", "desc"} else value
    return out


def effective_history(wandb_files: list[Path]) -> list[dict]:
    """The history W&B ends up with after syncing a run's attempts in order: an attempt started with
    ``resume_from="<id>?_step=k"`` (branch point k in its config) first truncates the history to steps <= k."""
    rows: list[dict] = []
    for path in wandb_files:
        point = read_run(path)["config"].get("_wandb", {}).get("branch_point")
        if point is not None:
            rows = [r for r in rows if r["_step"] <= point["step"]]
        rows += read_history(path)[1]
    return rows

"""Read back what a real offline W&B run wrote, so tests can assert on it.

wandb >= 0.19 no longer ships a Python reader for its ``.wandb`` transaction log. The file is a LevelDB-style log
(7-byte file header ``:W&B`` + magic + version, then 32 KiB blocks of chunks with a 7-byte header: crc32, length,
type FULL/FIRST/MIDDLE/LAST) whose payloads are ``wandb_internal_pb2.Record`` protobufs, decoded with wandb's own
message classes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero fill at the end of a preallocated block
            pos += left_in_block - HEADER
        else:
            raise ValueError(f"corrupt W&B log: chunk type {kind} at byte {pos}")


def read_run(run_file: Path) -> dict:
    """{'config': {...}, 'history': [{key: value}, ...], 'alerts': [{title, text, level}]} from a ``run-<id>.wandb``
    file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run log"
    out: dict = {"config": {}, "history": [], "run_id": None, "alerts": []}
    for payload in _payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "alert":
            out["alerts"].append({"title": record.alert.title, "text": record.alert.text, "level": record.alert.level})
        elif kind == "history":
            out["history"].append({
                (item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item
            })
    return out

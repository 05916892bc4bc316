"""Read an offline W&B run file (``run-*.wandb``) back into its protobuf records.

The file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks, each with a
7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last). Tests use this to check what
a run really wrote, without a network or a W&B server.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024
HEADER = struct.Struct("<IHB")


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    position, pending, payloads = 7, b"", []
    while position + HEADER.size <= len(data):
        if BLOCK_SIZE - position % BLOCK_SIZE < HEADER.size:  # block trailer too short for a header
            position += BLOCK_SIZE - position % BLOCK_SIZE
            continue
        _, length, kind = HEADER.unpack_from(data, position)
        position += HEADER.size
        chunk = data[position : position + length]
        position += length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def run_summary(path: str | Path) -> dict:
    """Run name and group, the config keys it logged, and the last value of every metric."""
    summary = {"name": None, "group": None, "config": {}, "metrics": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            summary["name"], summary["group"] = record.run.display_name, record.run.run_group
        elif kind == "config":
            for item in record.config.update:
                summary["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                summary["metrics"][key] = json.loads(item.value_json)
    return summary

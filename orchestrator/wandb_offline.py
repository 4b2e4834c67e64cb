"""The offline W&B run files of a run directory read back: what `wandb sync` would upload, for the
tests and for anyone who wants to check a stopped run kept every step without W&B's servers.

Test: `pytest tests/orchestrator/test_orch_tracking.py`.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Iterator


def offline_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every history row (`_step` and the logged values, JSON-decoded) in the offline W&B run files
    of `run_dir`, in the order written, over all the files of its run id (one per resumption).

    The files are wandb's record log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB-log blocks of 32 KiB whose records (CRC32, length, type: full/first/middle/last) hold
    serialized `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    run_id = (Path(run_dir) / "wandb-run-id").read_text().strip()
    # offline-run-<time>-<id>, or -<id>-<n> for a second one started in the same second
    dirs = [d for d in Path(run_dir).glob(f"wandb/offline-run-*-{run_id}*")
            if re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", d.name)]
    files = [d / f"run-{run_id}.wandb" for d in sorted(dirs) if (d / f"run-{run_id}.wandb").is_file()]
    rows = []
    for path in files:
        for payload in _leveldb_records(path.read_bytes()):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def _leveldb_records(data: bytes) -> Iterator[bytes]:
    block, header = 32768, 7
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, parts = header, []
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # the tail of a block too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0 and length == 0:  # zero padding (a preallocated or unfinished file)
            pos += room
            continue
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            yield b"".join(parts + [chunk])
            parts = []

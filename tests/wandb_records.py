"""Reads back what an offline W&B run wrote, for tests: the records of `run-<id>.wandb`.

That file is a LevelDB log (32 KiB blocks of checksummed chunks) of W&B's own protobuf `Record`s.
wandb 0.30 removed its Python reader of it (`wandb.sdk.internal.datastore`); this is the same
format in a few lines, parsed with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zeroed space past the last record
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"bad checksum in {path}"
        pos += CHUNK_HEADER + length
        parts += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def history(path: Path) -> list[dict]:
    """Each `run.log(...)` call as {key: value}; keys as logged ("train/loss", "eval/rouge1")."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def run_files(wandb_dir: Path) -> list[Path]:
    """The `run-<id>.wandb` files of the offline runs under `<wandb_dir>/wandb`, oldest first."""
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))

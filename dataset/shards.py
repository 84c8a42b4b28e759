"""The tables of a refined dataset: the schemas of its shards and rejects, and whole-file
Parquet/JSON reads and writes (local or S3). Where the files live is `dataset.refined`'s
business; every file is written whole under its final name or not at all
(see storage.write_bytes).
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import storage

SCHEMA_VERSION = 1

KEPT_FIELDS = [
    pa.field("image", pa.binary()),  # JPEG of the aligned 112x112 RGB face
    pa.field("identity", pa.string()),
    pa.field("key", pa.string()),
    pa.field("source", pa.string()),
    pa.field("det_score", pa.float32()),  # NaN where the source gave the landmarks
    pa.field("landmarks", pa.list_(pa.float32(), 10)),  # source pixels, x1 y1 ... x5 y5
    pa.field("box", pa.list_(pa.float32(), 4)),
    pa.field("num_faces", pa.int16()),
    pa.field("face_choice", pa.string()),
    pa.field("eye_distance", pa.float32()),
    pa.field("blur", pa.float32()),
    pa.field("dhash", pa.binary(32)),
]
STAGED_SCHEMA = pa.schema(KEPT_FIELDS)
SHARD_SCHEMA = pa.schema([KEPT_FIELDS[0], pa.field("label", pa.int32()), *KEPT_FIELDS[1:]])
REJECT_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("identity", pa.string()),
    pa.field("source", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
    pa.field("image", pa.binary()),  # aligned face when there is one, else the raw bytes (capped)
    pa.field("det_score", pa.float32()),
    pa.field("eye_distance", pa.float32()),
    pa.field("blur", pa.float32()),
])


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def table_bytes(table: pa.Table, row_group_rows: int, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression=compression)
    return sink.getvalue()


def write_table(uri: str, table: pa.Table, row_group_rows: int = 1000, compression: str = "zstd") -> None:
    """`compression` "none" for float data (embeddings): zstd gains nothing there and made
    every read 3x slower (100 MB shard: 0.6 s against 0.18 s)."""
    storage.write_bytes(uri, table_bytes(table, row_group_rows, compression))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def num_rows(uri: str) -> int:
    """Rows of a Parquet file, from its footer."""
    fs, path = storage.resolve(uri)
    return pq.read_metadata(path, filesystem=fs).num_rows


def write_json(uri: str, obj) -> None:
    storage.write_bytes(uri, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(uri: str):
    return json.loads(storage.read_bytes(uri))


def content_hash(shard_uris: list[str]) -> str:
    """Identifies this dataset version: a hash over the shards' bytes, in name order."""
    h = hashlib.sha256()
    for uri in sorted(shard_uris):
        h.update(uri.rsplit("/", 1)[-1].encode())
        h.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    return h.hexdigest()

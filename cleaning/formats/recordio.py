"""Write MXNet RecordIO files (`train.rec` + `train.idx`), the format insightface's
training code reads: export a refined dataset for arcface_torch, or build the baseline
the data-path benchmark compares against. (Reading is in cleaning/readers.py.)

A record is `mx.recordio.pack(IRHeader(flag=0, label, id, 0), jpeg)` framed as dmlc-core
writes it: magic, length word (continuation flag in the top 3 bits), payload padded to 4
bytes; a magic word occurring 4-byte aligned inside the payload splits the record into parts.
"""

from __future__ import annotations

import struct

from cleaning.readers import IR_HEADER, REC_MAGIC

_MAGIC = struct.pack("<I", REC_MAGIC)


def pack_record(label: float, payload: bytes, ident: int = 0) -> bytes:
    return IR_HEADER.pack(0, float(label), ident, 0) + payload


def write_record(fh, record: bytes) -> int:
    """Append one record; returns its offset (for the .idx file)."""
    start = fh.tell()
    cuts, pos = [], 0
    for i in range(0, len(record) - len(record) % 4, 4):
        if record[i:i + 4] == _MAGIC:
            cuts.append((pos, i))
            pos = i + 4
    parts = cuts + [(pos, len(record))]
    for n, (a, b) in enumerate(parts):
        flag = 0 if len(parts) == 1 else (1 if n == 0 else (3 if n == len(parts) - 1 else 2))
        fh.write(_MAGIC + struct.pack("<I", (flag << 29) | (b - a)) + record[a:b])
        fh.write(b"\0" * ((4 - (b - a) % 4) % 4))
    return start


def write_rec(path_prefix: str, items) -> int:
    """`items`: (label, jpeg bytes). Writes PREFIX.rec and PREFIX.idx (index i -> offset)."""
    n = 0
    with open(f"{path_prefix}.rec", "wb") as rec, open(f"{path_prefix}.idx", "w") as idx:
        for n, (label, jpeg) in enumerate(items, start=1):
            idx.write(f"{n}\t{write_record(rec, pack_record(label, jpeg))}\n")
    return n

"""Write MXNet RecordIO files (`train.rec` + `train.idx` + `property`) laid out as insightface's
tools write them, so arcface_torch's `MXFaceDataset` (and cleaning/readers.py) read them: export
a refined dataset for arcface_torch, or build the baseline the data-path benchmark compares
against. (Reading is in cleaning/readers.py.)

The insightface layout (`src/data/face2rec2.py`; read by `recognition/arcface_torch/dataset.py`):

* record 0, the header: `IRHeader(flag=2, label=[N + 1, N + 1 + C], id=0)`, no payload:
  images are records 1 .. N, identity records N + 1 .. N + C;
* records 1 .. N, the images: `IRHeader(flag=0, label=class, id=index)` + JPEG bytes
  (a sequence label packs as `mx.recordio.pack` does: flag = its length, float32 labels
  before the payload, class = label[0]);
* records N + 1 + c, one per class c = 0 .. C - 1: `IRHeader(flag=2, label=[first, end), id=index)`,
  the range of image records of class c;
* `train.idx`: one `index<TAB>offset` line per record (`MXIndexedRecordIO.write_idx`);
* `property`: `C,112,112` (insightface's `face_image.load_property`).

Records are written in index order by default: the header first, then images, then identities.
`order="face2rec2"` writes them as insightface's `face2rec2.py` does (`MXIndexedRecordIO` writes
records and .idx lines in the order they come): images 1 .. N first, then record 0, then the
identity records, so train.idx lists 1 .. N, 0, N + 1 .. N + C; its image labels are
`[class, aligned]` pairs (flag 2), as face2rec2 packs them. Readers go by train.idx, so the
same images come back either way.

A record is framed as dmlc-core's `RecordIOWriter` writes it: magic, length word (continuation
flag in the top 3 bits), payload, zero padding to 4 bytes; a magic word occurring 4-byte aligned
inside the record splits it into parts that the reader joins with the magic put back.
"""

from __future__ import annotations

import numbers
import os
import struct

import numpy as np

from cleaning.formats import RECORD_ORDERS
from cleaning.readers import IR_HEADER, REC_MAGIC

_MAGIC = struct.pack("<I", REC_MAGIC)
_MAX_RECORD = 1 << 29  # dmlc-core: "RecordIO only accept record less than 2^29 bytes"
_MAX_EXACT = 1 << 24  # record indices and class labels are float32 in the headers: exact up to 2^24
PROPERTY_FILE = "property"


def pack_record(label, payload: bytes, ident: int = 0) -> bytes:
    """`mx.recordio.pack(IRHeader(0, label, ident, 0), payload)`: a number is the header's label
    (flag 0); a sequence of numbers is written as float32 labels before the payload, flag = their count."""
    if isinstance(label, numbers.Number):
        return IR_HEADER.pack(0, float(label), ident, 0) + payload
    labels = np.asarray(label, np.float32).ravel()
    if labels.size == 0:
        raise ValueError("an empty label sequence: give a number or at least one label")
    return IR_HEADER.pack(labels.size, 0.0, ident, 0) + labels.tobytes() + payload


def write_record(fh, record: bytes) -> int:
    """Append one record; returns its offset (for the .idx file)."""
    if len(record) >= _MAX_RECORD:
        raise ValueError(f"a RecordIO record holds less than 2^29 bytes, this one has {len(record)}")
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
        fh.write(b"\0" * ((4 - (b - a) % 4) % 4))  # only the last part can be unaligned
    return start


def _payload(data) -> bytes:
    return data if isinstance(data, bytes) else bytes(memoryview(data))  # never bytes(n): a count


def _range_record(first: int, end: int, ident: int) -> bytes:
    return pack_record([float(first), float(end)], b"", ident)


def _class_of(label, n: int) -> int:
    value = label if isinstance(label, numbers.Number) else np.asarray(label, np.float64).ravel()[:1]
    if not isinstance(value, numbers.Number):
        if value.size == 0:
            raise ValueError(f"item {n}: an empty label sequence")
        value = value[0]
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
        raise ValueError(f"item {n}: label {label!r} is not a class index")
    return int(value)


ORDERS = RECORD_ORDERS


def write_rec(dest, items, *, header: bool | None = None, image_size: tuple[int, int] = (112, 112),
              order: str = "index") -> int:
    """Write `items` (label, encoded image bytes) as RecordIO; returns the number of images.

    `dest` is a folder (an existing directory, or a path ending in '/', created) for
    `train.rec`, `train.idx` and `property`, or a prefix for `PREFIX.rec` and `PREFIX.idx`.

    `header` (default: True for a folder, False for a prefix):
    * True: the insightface layout above. Labels must be class indices 0 .. C-1, each class's
      images together and the classes in order (0, 0, 1, 2, 2, ...); anything else raises
      ValueError (nothing is left behind: files are written under temporary names and renamed).
    * False: image records only, indices 0 .. N-1 (as `im2rec` writes them: record 0 is an image,
      flag 0, which arcface_torch and our reader take as "every record is an image"); any labels.

    `order` ("index" or "face2rec2", header layout only): the record order described above.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown record order {order!r}; choose from {', '.join(ORDERS)}")
    dest = os.fspath(dest)
    folder = dest.endswith(("/", os.sep)) or os.path.isdir(dest)
    if header is None:
        header = folder
    if order != "index" and not header:
        raise ValueError(f"order {order!r} is a layout with the header record (header=True)")
    if folder:
        os.makedirs(dest, exist_ok=True)
        rec_path, idx_path = os.path.join(dest, "train.rec"), os.path.join(dest, "train.idx")
    else:
        rec_path, idx_path = f"{dest}.rec", f"{dest}.idx"
    outputs = [rec_path, idx_path] + ([os.path.join(dest, PROPERTY_FILE)] if folder and header else [])
    tmp = {path: f"{path}.tmp-{os.getpid()}" for path in outputs}
    try:
        with open(tmp[rec_path], "wb") as rec:
            if header:
                listed, num_classes = (_write_face2rec2 if order == "face2rec2" else _write_insightface)(rec, items)
            else:
                listed = [(n, write_record(rec, pack_record(label, _payload(jpeg), n)))
                          for n, (label, jpeg) in enumerate(items)]
                num_classes = None
        count = len(listed) - (1 + num_classes if header else 0)
        with open(tmp[idx_path], "w") as idx:
            idx.writelines(f"{n}\t{off}\n" for n, off in listed)
        if folder and header:
            with open(tmp[os.path.join(dest, PROPERTY_FILE)], "w") as fh:
                fh.write(f"{num_classes},{int(image_size[0])},{int(image_size[1])}\n")
        for path in outputs:
            os.replace(tmp[path], path)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return count


def _write_images(rec, items, label_of) -> tuple[list[int], list[int]]:
    """Image records 1 .. N: (their offsets, the first image index of each class)."""
    offsets: list[int] = []
    starts: list[int] = []
    current = None
    for n, (label, jpeg) in enumerate(items):
        cls = _class_of(label, n)
        if cls != current:
            if cls != (0 if current is None else current + 1):
                seen = "the first item" if current is None else f"class {current}"
                raise ValueError(f"item {n}: label {cls} after {seen}: labels must be 0 .. C-1 with each "
                                 "class's images together, classes in order (sort or group the items)")
            current = cls
            starts.append(len(offsets) + 1)
        if len(offsets) + len(starts) + 2 >= _MAX_EXACT:
            raise ValueError(f"item {n}: over 2^24 records: the float32 labels of the header and identity "
                             "records would no longer hold exact indices")
        offsets.append(write_record(rec, pack_record(label_of(label, cls), _payload(jpeg), len(offsets) + 1)))
    return offsets, starts


def _write_identities(rec, starts: list[int], first_identity: int) -> list[tuple[int, int]]:
    ends = starts[1:] + [first_identity]
    return [(first_identity + c, write_record(rec, _range_record(start, end, first_identity + c)))
            for c, (start, end) in enumerate(zip(starts, ends))]


def _write_insightface(rec, items) -> tuple[list[tuple[int, int]], int]:
    """Header placeholder, images, identity records, then the header rewritten in place (its size
    does not change: two float32 labels of positive integers never contain the magic word).
    Returns (index, offset) of every record as listed, and the class count."""
    placeholder = _range_record(0, 0, 0)
    header_at = write_record(rec, placeholder)
    offsets, starts = _write_images(rec, items, lambda label, _: label)
    first_identity = len(offsets) + 1  # N + 1
    identities = _write_identities(rec, starts, first_identity)
    end_pos = rec.tell()
    rec.seek(header_at)
    record = _range_record(first_identity, first_identity + len(starts), 0)
    assert len(record) == len(placeholder) and _MAGIC not in record[IR_HEADER.size:]
    write_record(rec, record)
    rec.seek(end_pos)
    return [(0, header_at)] + [(n, off) for n, off in enumerate(offsets, start=1)] + identities, len(starts)


def _write_face2rec2(rec, items) -> tuple[list[tuple[int, int]], int]:
    """face2rec2's order: images, record 0, identity records; image labels [class, aligned = 1]."""
    offsets, starts = _write_images(rec, items, lambda _, cls: [float(cls), 1.0])
    first_identity = len(offsets) + 1
    header_at = write_record(rec, _range_record(first_identity, first_identity + len(starts), 0))
    identities = _write_identities(rec, starts, first_identity)
    return [(n, off) for n, off in enumerate(offsets, start=1)] + [(0, header_at)] + identities, len(starts)

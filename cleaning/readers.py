"""Readers for raw face datasets. Each turns a source into partitions of raw samples.

A format is planned once on the driver (`plan(fmt, source, target_records)` lists
partitions: small, picklable descriptions such as a group of identity folders or a byte
range of a TSV, in the partition's `detail`) and each partition is read on a worker
(`read_partition(part)`), streaming: nothing loads a whole dataset. Partitions never split
an identity, so per-identity steps (duplicate detection) see all of an identity's images in
one place. Which planner, reader and input files belong to a format is said by its entry in
the format registry (cleaning/formats/__init__.py); the code of each is here, a section per
format.

A problem with one record (malformed row, bad base64, unsafe identity name, corrupt
RecordIO record) yields a `RawSample` carrying `reject` = (reason, detail naming the file
and line), never an exception: the job records it and goes on.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import csv
import io
import itertools
import logging
import os
import posixpath
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs

from cleaning.formats import get_format, load
from dataset import storage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SAFE_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


@dataclass
class RawSample:
    key: str  # unique within the source
    identity: str
    source: str  # file (and line or record) it came from
    data: bytes | None = None
    landmarks: np.ndarray | None = None  # (5, 2) source pixels, when the source gives them
    box: np.ndarray | None = None  # x, y, w, h source pixels, when the source gives it
    reject: tuple[str, str] | None = None  # (reason, detail) when the record itself is bad
    aligned: bool = False  # already aligned 112x112 (insightface-rec): no detection


@dataclass
class Partition:
    format: str
    root: str
    index: int
    # What to read, in the format's own terms (its planner writes it, its reader reads it):
    # identity folders, a byte range of a file and its first line number, ... Small and picklable.
    detail: dict = field(default_factory=dict)
    # A slice [lo, hi) of the partition's records, in reading order: what is left to redo when
    # a partition killed its worker and is split to isolate the record that did it.
    subset: tuple[int, int] | None = None


def safe_identity(name: str) -> bool:
    """Identity names become folder names and labels: no separators, no '..', printable."""
    return bool(_SAFE_IDENTITY.match(name)) and ".." not in name


def _listdir(uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.resolve(uri)
    return fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=False))


@dataclass
class Entry:
    """One directory entry of an identity folder, classified without reading it."""

    name: str
    uri: str
    kind: str  # file | folder | link_outside_input | not_a_regular_file


def _entries(folder: str, root: str) -> list[Entry]:
    """Every entry of `folder`, by name. On local disks symlinks are resolved: one that leads
    outside `root` (the input) is never followed, and dangling links, FIFOs and devices are
    named as such; object stores have files and folders only."""
    if storage.is_s3(folder):
        kinds = {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}
        return [Entry(posixpath.basename(i.path), storage.join(folder, posixpath.basename(i.path)),
                      kinds.get(i.type, "not_a_regular_file")) for i in sorted(_listdir(folder), key=lambda i: i.path)]
    import os
    import stat

    base = os.path.realpath(root)
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        uri = os.path.join(folder, entry.name)
        target = os.path.realpath(uri)
        if entry.is_symlink() and os.path.commonpath([base, target]) != base:
            out.append(Entry(entry.name, uri, "link_outside_input"))
            continue
        try:
            mode = os.stat(uri).st_mode
        except OSError:  # a dangling link
            out.append(Entry(entry.name, uri, "not_a_regular_file"))
            continue
        kind = "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "not_a_regular_file"
        out.append(Entry(entry.name, uri, kind))
    return out


def entry_problem(entry: Entry) -> tuple[str, str] | None:
    """(reason, detail) for an entry that is not an image file to read; None for one that is."""
    if entry.kind == "link_outside_input":
        return "link_outside_input", f"{entry.uri}: a link to a file outside the input (not read)"
    if entry.kind == "not_a_regular_file":
        return "not_a_regular_file", f"{entry.uri}: a dangling link, FIFO, socket or device"
    if entry.kind == "folder":
        return "nested_folder", f"{entry.uri}: a folder inside an identity folder (its contents are not read)"
    if entry.name.startswith("."):
        return "hidden_file", f"{entry.uri}: a hidden file"
    if not entry.name.lower().endswith(IMAGE_SUFFIXES):
        return "not_an_image_file", f"{entry.uri}: unexpected file type"
    return None


def _read_range(uri: str, start: int, end: int) -> bytes:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as fh:
        fh.seek(start)
        return fh.read(end - start)


def _group(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


# Folder formats are planned in whole identities: `records_per_partition` images at about
# this many images per identity.
IMAGES_PER_IDENTITY_GUESS = 30


def _identities_per_partition(records_per_partition: int) -> int:
    return max(1, records_per_partition // IMAGES_PER_IDENTITY_GUESS)


# -- image folder ------------------------------------------------------------------------
# detail: "identities" (folder names), and on partition 0 "root_entries" (what else the
# root holds, each a reject).

def plan_image_folder(root: str, records_per_partition: int) -> list[Partition]:
    entries = _entries(root, root)
    dirs = [e.name for e in entries if e.kind == "folder"]
    groups = _group(dirs, _identities_per_partition(records_per_partition))
    parts = [Partition("image-folder", root, n, {"identities": ids}) for n, ids in enumerate(groups)]
    # Anything at the root that is not an identity folder is accounted for (as a reject).
    parts[0].detail["root_entries"] = [e.name for e in entries if e.kind != "folder"]
    return parts


def image_folder_inputs(part: Partition) -> list[tuple[str, str]]:
    root = [("listing", part.root)] if "root_entries" in part.detail else []
    return root + [("listing", storage.join(part.root, ident)) for ident in part.detail["identities"]]


def read_image_folder(part: Partition) -> Iterator[RawSample]:
    for name in part.detail.get("root_entries", []):
        uri = storage.join(part.root, name)
        yield RawSample(name, "", uri, reject=("outside_identity_folder",
                                               f"{uri}: not inside an identity folder (one folder per identity)"))
    for ident in part.detail["identities"]:
        folder = storage.join(part.root, ident)
        for entry in _entries(folder, part.root):
            rel = f"{ident}/{entry.name}"
            problem = entry_problem(entry)
            if not safe_identity(ident):
                yield RawSample(rel, ident, entry.uri, reject=("unsafe_identity", f"{entry.uri}: identity name {ident!r}"))
            elif problem:
                yield RawSample(rel, ident, entry.uri, reject=problem)
            else:
                yield RawSample(rel, ident, entry.uri, data=storage.read_bytes(entry.uri))


# -- VGGFace2 ----------------------------------------------------------------------------
# detail: "split"; "identities" (folders of <split>/); "bb" and "lm": identity -> its rows'
# (byte start, byte end, first line) in the box and landmark CSVs; on partition 0
# "root_entries" (what else <split>/ holds); on a last partition "orphans" (identities with
# annotation rows and no folder).

VGG_BB = "bb_landmark/loose_bb_{split}.csv"
VGG_LM = "bb_landmark/loose_landmark_{split}.csv"


def _csv_identity_ranges(uri: str) -> dict[str, list[tuple[int, int, int]]]:
    """Byte ranges and first lines of each identity's rows in a VGGFace2 annotation CSV.

    The CSVs are sorted by NAME_ID, so one streaming pass finds one contiguous range per
    identity; an identity whose rows are scattered gets several ranges (nothing is lost).
    Workers then read only their identities' rows.
    """
    ranges: dict[str, list[tuple[int, int, int]]] = {}
    if not storage.exists(uri):
        return ranges
    fs, path = storage.resolve(uri)
    offset, line_no, current, start, start_line = 0, 0, None, 0, 0
    with fs.open_input_stream(path) as fh:
        for raw in io.BufferedReader(fh, buffer_size=1 << 20):
            line_no += 1
            if line_no > 1:  # header
                ident = raw.split(b",", 1)[0].split(b"/", 1)[0].decode("utf-8", "replace")
                if ident != current:
                    if current is not None:
                        ranges.setdefault(current, []).append((start, offset, start_line))
                    current, start, start_line = ident, offset, line_no
            offset += len(raw)
    if current is not None:
        ranges.setdefault(current, []).append((start, offset, start_line))
    return ranges


def plan_vggface2(root: str, records_per_partition: int, split: str = "train") -> list[Partition]:
    image_root = storage.join(root, split)
    entries = _entries(image_root, root)
    dirs = [e.name for e in entries if e.kind == "folder"]
    bb = _csv_identity_ranges(storage.join(root, VGG_BB.format(split=split)))
    lm = _csv_identity_ranges(storage.join(root, VGG_LM.format(split=split)))

    def rows_of(ids: list[str]) -> dict:
        return {"bb": {i: bb[i] for i in ids if i in bb}, "lm": {i: lm[i] for i in ids if i in lm}}

    parts = [Partition("vggface2", root, n, {"split": split, "identities": ids, **rows_of(ids)})
             for n, ids in enumerate(_group(dirs, _identities_per_partition(records_per_partition)))]
    parts[0].detail["root_entries"] = [e.name for e in entries if e.kind != "folder"]
    # Annotation rows whose identity has no folder still have to be accounted for.
    orphans = sorted((set(bb) | set(lm)) - set(dirs))
    if orphans:
        parts.append(Partition("vggface2", root, len(parts),
                               {"split": split, "identities": [], "orphans": orphans, **rows_of(orphans)}))
    return parts


def vggface2_inputs(part: Partition) -> list[tuple[str, str]]:
    split = part.detail["split"]
    annotations = [("file", storage.join(part.root, name.format(split=split))) for name in (VGG_BB, VGG_LM)]
    listings = [("listing", storage.join(part.root, split))] if "root_entries" in part.detail else []
    return annotations + listings + [("listing", storage.join(part.root, split, ident))
                                     for ident in part.detail["identities"]]


def _parse_rows(uri: str, ranges: list[tuple[int, int, int]], width: int) -> dict[str, tuple[list[float] | None, str]]:
    """NAME_ID -> (values or None when malformed, 'file:line' for messages)."""
    out = {}
    for start, end, first_line in ranges:
        text = _read_range(uri, start, end).decode("utf-8", "replace")
        for k, row in enumerate(csv.reader(io.StringIO(text))):
            where = f"{uri}:{first_line + k}"
            if not row:
                continue
            name = row[0]
            try:
                if len(row) != width:
                    raise ValueError(f"{len(row)} columns, expected {width}")
                values = [float(v) for v in row[1:]]
                if not all(np.isfinite(values)):
                    raise ValueError("non-finite value")
                out[name] = (values, where)
            except ValueError as exc:
                out[name] = (None, f"{where}: {exc}")
    return out


def read_vggface2(part: Partition) -> Iterator[RawSample]:
    detail = part.detail
    split, identities = detail["split"], detail["identities"]
    bb_uri = storage.join(part.root, VGG_BB.format(split=split))
    lm_uri = storage.join(part.root, VGG_LM.format(split=split))
    for name in detail.get("root_entries", []):
        uri = storage.join(part.root, split, name)
        yield RawSample(name, "", uri, reject=("outside_identity_folder",
                                               f"{uri}: not inside an identity folder of {split}/"))
    for ident in identities + detail.get("orphans", []):
        boxes = _parse_rows(bb_uri, detail["bb"][ident], 5) if ident in detail["bb"] else {}
        marks = _parse_rows(lm_uri, detail["lm"][ident], 11) if ident in detail["lm"] else {}
        seen = set()
        folder = storage.join(part.root, split, ident)
        entries = [] if ident not in identities else _entries(folder, part.root)
        stems: dict[str, int] = {}
        for entry in entries:
            stem = posixpath.splitext(entry.name)[0]
            stems[stem] = stems.get(stem, 0) + 1
        for entry in entries:
            name, uri = entry.name, entry.uri
            stem, suffix = posixpath.splitext(name)
            key = f"{ident}/{stem}"
            seen.add(key)
            problem = entry_problem(entry)
            if not safe_identity(ident):
                yield RawSample(key, ident, uri, reject=("unsafe_identity", f"{uri}: identity name {ident!r}"))
                continue
            if stems[stem] > 1:  # 0001_01.jpg and 0001_01.png: whose annotation row is it?
                yield RawSample(f"{ident}/{name}", ident, uri,
                                reject=("ambiguous_key", f"{uri}: {stems[stem]} files share the key {key}"))
                continue
            if problem:
                yield RawSample(key, ident, uri, reject=problem)
                continue
            sample = RawSample(key, ident, uri, data=storage.read_bytes(uri))
            bb, lm = boxes.get(key), marks.get(key)
            if bb is None or lm is None:
                pass  # no annotation: the detector decides
            elif bb[0] is None or lm[0] is None:
                bad = bb if bb[0] is None else lm
                sample.reject = ("malformed_annotation", bad[1])
            else:
                sample.box = np.array(bb[0], np.float32)
                sample.landmarks = np.array(lm[0], np.float32).reshape(5, 2)
            yield sample
        # Rows that name an image we do not have: accounted for, as rejects.
        for key in sorted((set(boxes) | set(marks)) - seen):
            where = (boxes.get(key) or marks.get(key))[1]
            yield RawSample(f"annotation:{key}", ident, where,
                            reject=("annotation_without_image", f"{where}: no image file for {key}"))


# -- MS-Celeb-1M TSV ---------------------------------------------------------------------
# Partition root: the .tsv file. detail: "byte_range" [start, end) of whole lines and the
# "first_line"'s number.

def _tsv_part(uri: str, index: int, start: int, end: int, first_line: int) -> Partition:
    return Partition("msceleb-tsv", uri, index, {"byte_range": (start, end), "first_line": first_line})


def plan_msceleb(root: str, target_records: int) -> list[Partition]:
    """Cut the TSV into byte ranges of about `target_records` lines, only where the MID changes."""
    uri = root if root.endswith(".tsv") else _find_tsv(root)
    fs, path = storage.resolve(uri)
    parts: list[Partition] = []
    offset, line_no, start, start_line, count, prev = 0, 0, 0, 1, 0, None
    with fs.open_input_stream(path) as fh:
        for raw in io.BufferedReader(fh, buffer_size=1 << 20):
            line_no += 1
            mid = raw.split(b"\t", 1)[0]
            if count >= target_records and mid != prev:
                parts.append(_tsv_part(uri, len(parts), start, offset, start_line))
                start, start_line, count = offset, line_no, 0
            prev = mid
            count += 1
            offset += len(raw)
    if count:
        parts.append(_tsv_part(uri, len(parts), start, offset, start_line))
    return parts


def msceleb_inputs(part: Partition) -> list[tuple[str, str]]:
    return [("file", part.root)]


def _find_tsv(root: str) -> str:
    tsvs = storage.list_files(root, suffix=".tsv", recursive=False)
    if len(tsvs) != 1:
        raise FileNotFoundError(f"{root}: expected exactly one .tsv file, found {len(tsvs)}")
    return tsvs[0]


def read_msceleb(part: Partition) -> Iterator[RawSample]:
    start, end = part.detail["byte_range"]
    data = _read_range(part.root, start, end)
    name = posixpath.basename(part.root)
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the range
    for k, raw in enumerate(lines):
        line = part.detail["first_line"] + k
        where = f"{name}:{line}"
        cols = raw.rstrip(b"\r").split(b"\t")
        mid = cols[0].decode("utf-8", "replace")
        key = f"{mid}/{cols[4].decode('utf-8', 'replace')}" if len(cols) > 4 else f"line:{line}"
        if len(cols) != 7:
            yield RawSample(key, mid, where, reject=("malformed_row", f"{where}: {len(cols)} columns, expected 7"))
            continue
        if not safe_identity(mid):
            yield RawSample(key, mid, where, reject=("unsafe_identity", f"{where}: identity {mid!r}"))
            continue
        try:
            image = base64.b64decode(cols[6], validate=True)
        except (binascii.Error, ValueError) as exc:
            yield RawSample(key, mid, where, reject=("invalid_base64", f"{where}: FaceData: {exc}"))
            continue
        try:
            rect = base64.b64decode(cols[5], validate=True)
            x, y, w, h = struct.unpack("<4f", rect)
        except (binascii.Error, ValueError, struct.error) as exc:
            yield RawSample(key, mid, where, reject=("malformed_row", f"{where}: FaceRectangle: {exc}"))
            continue
        sample = RawSample(key, mid, where, data=image)
        if w > 0 and h > 0:
            # Relative to the FaceData image; made absolute once the image is decoded.
            sample.box = np.array([x, y, w, h], np.float32)
        yield sample


# -- insightface RecordIO (MS1MV2 / MS1MV3 as distributed) ---------------------------------
# Partition root: the folder of train.rec and train.idx. detail, as streamed: "byte_range"
# [start, end) of train.idx lines and the "first_line"'s number, with insightface's header
# the "identity_records" [first, end) to skip; as planned in memory: "records", a list of
# (index, offset, idx line), and on partition 0 "bad_idx_lines" [(idx line, what is wrong)].

REC_MAGIC = 0xCED7230A
IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    pass


_MAX_RECORD_BYTES = 1 << 29  # dmlc-core: "RecordIO only accept record less than 2^29 bytes"
# A train.idx line is 'index<TAB>offset\n': two decimal integers, under 45 bytes. A line this
# long is no index line: reading stops there instead of buffering a newline-free file whole.
_MAX_IDX_LINE = 1024
_MIN_IDX_LINE = len(b"0\t0\n")  # the shortest line an index can have
# The smallest record train.rec can hold: the 8-byte frame and the 24-byte IRHeader.
_MIN_REC_RECORD = 8 + IR_HEADER.size


def regular_file_size(uri: str) -> int:
    """The size of `uri`, which must be a regular file (links followed): a FIFO would block the
    reader and a device (/dev/zero) never ends; RecordIOError naming the file otherwise."""
    if storage.is_s3(uri):  # object stores hold nothing but regular objects
        return storage.size(uri)
    _, path = storage.resolve(uri)
    try:
        mode = os.stat(path)
    except OSError as exc:
        raise RecordIOError(f"{uri}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode.st_mode):
        raise RecordIOError(f"{uri}: not a regular file (a FIFO, device or folder); give the file itself")
    return mode.st_size


def read_record(fh, offset: int) -> bytes:
    """One logical record at `offset`, joining continuation parts as dmlc-core's reader does."""
    _seek(fh, offset)
    out = bytearray()
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise RecordIOError(f"offset {offset}: file ends inside a record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != REC_MAGIC:
            raise RecordIOError(f"offset {offset}: bad magic 0x{magic:08X}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if len(out) + length >= _MAX_RECORD_BYTES:  # continuation parts must not add up past it
            raise RecordIOError(f"offset {offset}: a record of over 2^29 bytes (dmlc-core's limit)")
        payload = fh.read((length + 3) & ~3)
        if len(payload) < length:
            raise RecordIOError(f"offset {offset}: record truncated")
        out += payload[:length]
        if cflag in (0, 3):
            return bytes(out)
        # A part boundary stands where the writer removed a magic word from the data.
        out += struct.pack("<I", REC_MAGIC)


def _seek(fh, offset: int) -> None:
    """fh.seek; an offset beyond what can be sought (a corrupt train.idx's 2^62, which lseek
    refuses, or 2^70, over pyarrow's C long) is a RecordIOError, as a short read past the end is."""
    try:
        fh.seek(offset)
    except (OSError, OverflowError) as exc:
        raise RecordIOError(f"offset {offset}: past the end of train.rec ({exc})") from None


def unpack_record(record: bytes) -> tuple[int, np.ndarray, int, bytes]:
    """(flag, labels, id, payload): the `mx.recordio.pack` layout."""
    if len(record) < IR_HEADER.size:
        raise RecordIOError("record shorter than its header")
    flag, label, ident, _ = IR_HEADER.unpack_from(record)
    body = record[IR_HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"record declares {flag} labels but is too short")
        labels = np.frombuffer(body[:4 * flag], np.float32).copy()
        body = body[4 * flag:]
    else:
        labels = np.array([label], np.float32)
    return flag, labels, ident, body


def _rec_identity_ranges(fh, offsets: dict[int, int], first: int, end: int) -> tuple[list[tuple[int, int]], list]:
    """[start, end) image indices of each identity record first..end-1 (one read when the
    identity records lie together, as insightface's tools write them)."""
    ids = [i for i in range(first, end) if i in offsets]
    missing = [i for i in range(first, end) if i not in offsets]
    ranges = []
    if ids:
        lo, hi = min(offsets[i] for i in ids), max(offsets[i] for i in ids)
        span = hi - lo + 4096  # an identity record is ~40 bytes: the last one fits in this
        block = io.BytesIO(_seek_read(fh, lo, span)) if span <= (64 << 20) else None
        for i in ids:
            source, at = (block, offsets[i] - lo) if block is not None else (fh, offsets[i])
            try:
                flag, labels, _, _ = unpack_record(read_record(source, at))
                if flag < 2:
                    raise RecordIOError("identity record without a [start, end) label")
                ranges.append((int(labels[0]), int(labels[1])))
            except RecordIOError as exc:
                raise RecordIOError(f"identity record {i}: {exc}") from None
    return ranges, missing


def _seek_read(fh, offset: int, size: int) -> bytes:
    _seek(fh, offset)
    return fh.read(size)


def _rec_label(fh, offset: int) -> int | None:
    """A record's class label from its header bytes alone (None when unreadable: the reader
    rejects that record with the reason)."""
    try:
        _seek(fh, offset)
        head = fh.read(8 + IR_HEADER.size + 4)
        flag, label, _, _ = IR_HEADER.unpack_from(head, 8)
        return int(struct.unpack_from("<f", head, 8 + IR_HEADER.size)[0]) if flag > 0 else int(label)
    except (struct.error, ValueError, OverflowError):  # RecordIOError is a ValueError
        return None


def _parse_idx_line(raw: bytes) -> tuple[int, int]:
    """'index<TAB>offset' -> (index, offset); ValueError saying what is wrong otherwise."""
    cols = raw.rstrip(b"\r\n").split(b"\t")
    if len(cols) != 2:
        raise ValueError("expected 'index<TAB>offset'")
    index, offset = int(cols[0]), int(cols[1])
    if index < 0 or offset < 0:
        raise ValueError("negative index or offset")
    return index, offset


def _idx_lines(idx_uri: str, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[tuple[int, int, bytes, tuple[int, int] | None]]:
    """(byte offset, line number, line, (index, offset) or None when malformed) for each line
    of a .idx from byte `start` (a line start, numbered `first_line`) to `end`, streamed: the
    driver never holds the index."""
    regular_file_size(idx_uri)
    fs, path = storage.resolve(idx_uri)
    with fs.open_input_file(path) as fh:
        fh.seek(start)
        reader = io.BufferedReader(fh, buffer_size=1 << 20)
        pos, line_no = start, first_line
        while end is None or pos < end:
            raw = reader.readline(_MAX_IDX_LINE + 1)  # bounded: a file with no newline is not held
            if not raw:
                return
            if len(raw) > _MAX_IDX_LINE:
                raise RecordIOError(f"{idx_uri}:{line_no}: a line of over {_MAX_IDX_LINE} bytes: an index "
                                    "line is 'index<TAB>offset' (is this a train.idx?)")
            try:
                parsed = _parse_idx_line(raw)
            except ValueError:
                parsed = None
            yield pos, line_no, raw, parsed
            pos += len(raw)
            line_no += 1


def _bad_idx_line(line_no: int, raw: bytes) -> str:
    try:
        _parse_idx_line(raw)
        problem = "unparsable"
    except ValueError as exc:
        problem = str(exc)
    text = raw.rstrip(b"\r\n")[:60].decode("utf-8", "replace")
    return f"train.idx:{line_no}: {problem}: {text!r}"


class _Unsorted(Exception):
    """The .idx cannot be planned from its runs (the message says why): planned in memory."""


# The first pass over train.idx keeps runs: lines listing consecutive record indices a, a+1,
# .., b. Runs listed one after another with increasing indices form a stretch, which the
# partitions cut (a partition is one byte range of the index). As insightface's tools write
# it, an index is one stretch (in index order: our writer, im2rec) or two (face2rec2: images
# 1..N, then record 0 and the identity records); a record left out (face2rec2 skips an image
# it cannot read) starts a new run of the same stretch. Past this many runs the index is
# scrambled and planned in memory: a run costs the driver ~100 bytes, so this bounds the
# driver whatever the record count.
_MAX_RUNS = 65536


@dataclass(slots=True)
class _Run:
    first_key: int
    last_key: int
    byte_start: int
    first_line: int
    stretch: int
    byte_end: int = 0


@dataclass
class _IndexScan:
    runs: list[_Run]  # in file order
    stretch_starts: list[tuple[int, int]]  # (byte offset, line number) where each stretch starts
    header_run: int | None  # the run record 0 starts (it is the smallest index)
    identity_records: tuple[int, int] | None  # [first, end) from insightface's header record
    identity_offsets: dict[int, int]  # offsets of the identity records listed after record 0
    last_offset: int = -1  # the largest record offset listed (see check_index_reaches_the_end)


def record_end(fh, offset: int) -> int | None:
    """Where the record at `offset` ends (its parts' headers read, not their data), or None
    when its framing is broken (the reader rejects that record with the reason)."""
    position = offset
    for _ in range(1 << 16):  # parts of one record: bounded, a corrupt chain must not loop
        try:
            _seek(fh, position)
        except RecordIOError:
            return None
        head = fh.read(8)
        if len(head) < 8:
            return None
        magic, lrec = struct.unpack("<II", head)
        if magic != REC_MAGIC:
            return None
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        position += 8 + ((length + 3) & ~3)
        if cflag in (0, 3):
            return position
    return None


def check_index_reaches_the_end(fh, last_offset: int, idx_uri: str, rec_uri: str) -> None:
    """The record listed last in train.rec must end where the file ends: records after it are
    in no index line, and would be lost without a trace (an index cut short read 43 of 70
    records with only a warning). Gaps inside are face2rec2's way (an image it could not
    read is neither written nor listed) and cost nothing."""
    size = regular_file_size(rec_uri)
    end = record_end(fh, last_offset) if last_offset >= 0 else 0
    if end is not None and end < size:
        raise RecordIOError(f"{idx_uri} lists records up to byte {end} of {rec_uri}, which holds {size} bytes: the "
                            f"records after byte {end} are in no index line (an index cut short, or records appended "
                            "after it was written); rebuild train.idx with the tool that wrote train.rec")


def _header_range(fh, offset: int, idx_uri: str, rec_uri: str) -> tuple[int, int] | None:
    """Record 0's [first, end) identity-record range, or None when it is an image (im2rec)."""
    flag, labels = _read_header_record(fh, offset, idx_uri, rec_uri)
    return check_header_range(labels, idx_uri, rec_uri) if flag >= 2 else None


def _read_header_record(fh, offset: int, idx_uri: str, rec_uri: str) -> tuple[int, np.ndarray]:
    """Record 0's flag and labels; unreadable (an offset past train.rec's end, a broken frame)
    it is refused naming both files: nothing can be planned without it."""
    try:
        flag, labels, _, _ = unpack_record(read_record(fh, offset))
    except RecordIOError as exc:
        raise RecordIOError(f"{rec_uri}: record 0 (the header), listed in {idx_uri}: {exc}") from None
    return flag, labels


def check_header_range(labels: np.ndarray, idx_uri: str, rec_uri: str) -> tuple[int, int]:
    """Record 0's labels [N + 1, N + 1 + C] as integers, refused (RecordIOError, one line) unless
    they are finite whole numbers with 1 <= first <= end and the `end` records they declare fit
    in both files: every record takes a line of train.idx (at least 4 bytes) and a frame and
    header in train.rec (at least 32 bytes). Checked before anything is sized by them: a
    header claiming 2^31 identities (or 3e38) would otherwise size the planner's lists."""
    where = f"{rec_uri}: record 0 (the header)"
    first, end = (float(v) for v in labels[:2])
    if not (np.isfinite(first) and np.isfinite(end) and first.is_integer() and end.is_integer()):
        raise RecordIOError(f"{where}: identity records [{first}, {end}) are not whole numbers")
    first, end = int(first), int(end)
    if not 1 <= first <= end:
        raise RecordIOError(f"{where}: identity records [{first}, {end}) must satisfy 1 <= first <= end")
    fit = min(regular_file_size(idx_uri) // _MIN_IDX_LINE, regular_file_size(rec_uri) // _MIN_REC_RECORD)
    if end > fit:
        raise RecordIOError(f"{where}: declares {end} records (images and {end - first} identities), more than "
                            f"train.idx and train.rec can hold ({fit}): the header is corrupt")
    return first, end


def _scan_index(idx_uri: str, fh, rec_uri: str) -> _IndexScan:
    """The first pass over train.idx: its runs and stretches, and the identity records'
    offsets once record 0 (read on sight) has said which records those are. A malformed line
    stays inside its run's bytes, where the worker reading them rejects it."""
    scan = _IndexScan([], [(0, 1)], None, None, {})
    runs, current, end = scan.runs, None, 0
    rec_size = regular_file_size(rec_uri)
    for pos, line_no, raw, parsed in _idx_lines(idx_uri):
        end = pos + len(raw)
        if parsed is None:
            continue
        key, offset = parsed
        if offset < rec_size:  # one past the end is its worker's reject (the offset named)
            scan.last_offset = max(scan.last_offset, offset)
        if current is not None and key == current.last_key + 1:
            current.last_key = key
        else:
            if current is None:
                current = _Run(key, key, 0, 1, 0)
            else:
                if len(runs) >= _MAX_RUNS:
                    raise _Unsorted(f"records are listed in over {_MAX_RUNS} runs of consecutive indices")
                current.byte_end = pos
                stretch = current.stretch
                if key <= current.last_key:
                    stretch += 1
                    scan.stretch_starts.append((pos, line_no))
                current = _Run(key, key, pos, line_no, stretch)
            runs.append(current)
        if key == 0:
            scan.header_run = len(runs) - 1
            scan.identity_records = _header_range(fh, offset, idx_uri, rec_uri)
        elif scan.identity_records and scan.identity_records[0] <= key < scan.identity_records[1]:
            scan.identity_offsets[key] = offset
    if current is None or scan.header_run is None:
        raise _Unsorted("no entry for record 0")  # the in-memory planner says so, as an error
    current.byte_end = end
    return scan


def plan_insightface_rec(root: str, records_per_partition: int) -> list[Partition]:
    """Partitions of whole identities, each a byte range of train.idx (the worker reads its
    own lines): the driver streams the index and holds one entry per identity and per run of
    consecutive indices, never one per record (10M records of raw MS-Celeb would otherwise
    cost gigabytes here).

    With insightface's header record (record 0, label [first identity record, end]) the
    identity records give each identity's image range; without one, the records' own labels
    are read (header bytes only) and the cut falls where the label changes. The index may be
    in index order (our writer, im2rec) or in face2rec2's (images 1..N, then record 0 and the
    identity records). A record listed twice, an identity whose images are listed in two
    places, or a scrambled index is planned in memory (~380 bytes a record in the driver),
    where a record listed twice is rejected with its line."""
    idx_uri, rec_uri = storage.join(root, "train.idx"), storage.join(root, "train.rec")
    regular_file_size(idx_uri), regular_file_size(rec_uri)  # before opening: a FIFO would block here
    with storage.open_input(rec_uri) as fh:
        try:
            return _plan_rec_streamed(root, idx_uri, fh, records_per_partition)
        except _Unsorted as why:
            log.warning("%s: %s; planning with the whole index in memory", idx_uri, why)
            return _plan_rec_in_memory(root, idx_uri, fh, records_per_partition)


def _plan_rec_streamed(root: str, idx_uri: str, fh, per_partition: int) -> list[Partition]:
    scan = _scan_index(idx_uri, fh, storage.join(root, "train.rec"))
    check_index_reaches_the_end(fh, scan.last_offset, idx_uri, storage.join(root, "train.rec"))
    by_key = sorted(scan.runs, key=lambda r: r.first_key)
    for a, b in zip(by_key, by_key[1:]):
        if a.last_key >= b.first_key:  # runs hold every index in their range: a true repeat
            raise _Unsorted(f"record {b.first_key} is listed twice")
    if scan.identity_records is None:
        if len(scan.stretch_starts) > 1 or scan.runs[0].first_key != 0:
            raise _Unsorted("with no header record, records must be listed from 0 in increasing order")
        return _plan_rec_by_label(root, idx_uri, fh, per_partition)
    first_identity, end_identity = scan.identity_records
    # Identity records listed before record 0 (in neither insightface order) are read now.
    for run in scan.runs[:scan.header_run]:
        if run.first_key < end_identity and run.last_key >= first_identity:
            for _, _, _, parsed in _idx_lines(idx_uri, run.byte_start, run.byte_end, run.first_line):
                if parsed is not None and first_identity <= parsed[0] < end_identity:
                    scan.identity_offsets[parsed[0]] = parsed[1]
    ranges, missing = _rec_identity_ranges(fh, scan.identity_offsets, first_identity, end_identity)
    if missing:  # their images are still read; only the grouping is lost
        log.warning("%s: %d identity records are not indexed (e.g. %d)", idx_uri, len(missing), missing[0])
    firsts, lasts = [r.first_key for r in by_key], [r.last_key for r in by_key]
    # changes[i]: how often the stretch changes among by_key[0..i]; a slice of runs lies in
    # one stretch when the count does not move across it.
    changes = list(itertools.accumulate((int(a.stretch != b.stretch) for a, b in zip(by_key, by_key[1:])),
                                        initial=0))
    # Partitions start at the first image of an identity once the one before holds enough,
    # and where each stretch starts; so an identity's images must lie in one stretch.
    wants: list[tuple[int, int]] = []  # (stretch, first image index)
    size = 0
    for start, end in sorted(ranges):
        lo, hi = bisect.bisect_left(lasts, start), bisect.bisect_right(firsts, end - 1)
        if lo < hi and changes[hi - 1] != changes[lo]:
            raise _Unsorted(f"the images of identity [{start}, {end}) are listed in two places")
        if size >= per_partition and lo < hi:  # (an identity with no image listed cuts nothing)
            wants.append((by_key[lo].stretch, start))
            size = 0
        size += max(end - start, 0)
    return _cut_stretches(root, idx_uri, scan, sorted(wants), {"identity_records": [first_identity, end_identity]})


def _cut_stretches(root: str, idx_uri: str, scan: _IndexScan, wants: list[tuple[int, int]],
                   extra: dict) -> list[Partition]:
    """The second pass: partitions as byte ranges of train.idx, cut where each stretch starts
    and, within a stretch, at the first line at or past each wanted image index. A range that
    holds no image and no malformed line (the header and identity records, which face2rec2
    lists last) is no partition."""
    first_identity, end_identity = extra["identity_records"]
    segments: list[list] = []  # [byte offset, line number, holds something to read]
    stretch, keys, w = -1, [], 0
    for pos, no, _, parsed in _idx_lines(idx_uri):
        if stretch + 1 < len(scan.stretch_starts) and pos >= scan.stretch_starts[stretch + 1][0]:
            stretch += 1
            keys = [k for _, k in wants[bisect.bisect_left(wants, (stretch, -1)):
                                        bisect.bisect_left(wants, (stretch + 1, -1))]]
            w = 0
            segments.append([pos, no, False])
        if parsed is None:
            segments[-1][2] = True
            continue
        key = parsed[0]
        if w < len(keys) and key >= keys[w]:
            if segments[-1][0] != pos:
                segments.append([pos, no, False])
            while w < len(keys) and keys[w] <= key:
                w += 1
        if key != 0 and not first_identity <= key < end_identity:
            segments[-1][2] = True
    ends = [s[0] for s in segments[1:]] + [storage.size(idx_uri)]
    kept = [(s, e) for s, e in zip(segments, ends) if s[2]] or [(segments[0], ends[0])]
    return [Partition("insightface-rec", root, k, {"byte_range": (s[0], e), "first_line": s[1], **extra})
            for k, (s, e) in enumerate(kept)]


def _plan_rec_by_label(root: str, idx_uri: str, fh, per_partition: int) -> list[Partition]:
    """No header (im2rec): every record is an image; the records' own labels are read (header
    bytes only) and a partition ends where the label changes once it holds enough."""
    cuts: list[tuple[int, int]] = [(0, 1)]  # (byte offset, line number) where each partition starts
    size, previous = 0, None
    for pos, no, _, parsed in _idx_lines(idx_uri):
        if parsed is None:
            size += 1
            continue
        label = _rec_label(fh, parsed[1])
        if size and size >= per_partition and label != previous:
            cuts.append((pos, no))
            size = 0
        size += 1
        previous = label
    ends = [c[0] for c in cuts[1:]] + [storage.size(idx_uri)]
    return [Partition("insightface-rec", root, k, {"byte_range": (pos, end), "first_line": no})
            for k, ((pos, no), end) in enumerate(zip(cuts, ends))]


def _plan_rec_in_memory(root: str, idx_uri: str, fh, per_partition: int) -> list[Partition]:
    entries, bad, seen = [], [], set()
    for _, line_no, raw, parsed in _idx_lines(idx_uri):
        if parsed is None:
            bad.append((line_no, _bad_idx_line(line_no, raw)))
        elif parsed[0] in seen:
            bad.append((line_no, f"train.idx:{line_no}: record {parsed[0]} is listed twice"))
        else:
            seen.add(parsed[0])
            entries.append((parsed[0], parsed[1], line_no))
    offsets = {i: off for i, off, _ in entries}
    if 0 not in offsets:
        raise RecordIOError(f"{idx_uri}: no entry for record 0 (an insightface .idx starts there)")
    rec_size = regular_file_size(storage.join(root, "train.rec"))
    check_index_reaches_the_end(fh, max((o for o in offsets.values() if o < rec_size), default=-1), idx_uri,
                                storage.join(root, "train.rec"))
    entries.sort()
    flag, labels = _read_header_record(fh, offsets[0], idx_uri, storage.join(root, "train.rec"))
    groups: list[list[tuple[int, int, int]]] = []
    if flag >= 2:
        first_identity, end_identity = check_header_range(labels, idx_uri, storage.join(root, "train.rec"))
        images = {e[0]: e for e in entries if e[0] != 0 and not first_identity <= e[0] < end_identity}
        ranges, missing = _rec_identity_ranges(fh, offsets, first_identity, end_identity)
        for start, end in sorted(ranges):
            groups.append([images.pop(i) for i in range(start, end) if i in images])
        if images:  # images no identity record claims: read (and accounted for) all the same
            groups.append(sorted(images.values()))
        if missing:
            log.warning("%s: %d identity records are not indexed (e.g. %d)", idx_uri, len(missing), missing[0])
    else:
        current, last = [], object()
        for entry in entries:
            label = _rec_label(fh, entry[1])
            if current and label != last:
                groups.append(current)
                current = []
            current.append(entry)
            last = label
        if current:
            groups.append(current)
    parts: list[Partition] = []
    chunk: list[tuple[int, int, int]] = []
    for group in groups:  # whole identities, about `per_partition` records each
        chunk += group
        if len(chunk) >= per_partition:
            parts.append(Partition("insightface-rec", root, len(parts), {"records": chunk}))
            chunk = []
    if chunk or not parts:
        parts.append(Partition("insightface-rec", root, len(parts), {"records": chunk}))
    if bad:
        parts[0].detail["bad_idx_lines"] = bad
    return parts


def insightface_rec_inputs(part: Partition) -> list[tuple[str, str]]:
    return [("listing", part.root)]


def _rec_entries(part: Partition) -> Iterator[tuple[int, int, int] | tuple[int, str]]:
    """(index, offset, idx line) of each image record of a partition, or (idx line, what is
    wrong) for a malformed .idx line."""
    detail = part.detail
    yield from detail.get("bad_idx_lines", [])
    yield from detail.get("records", [])
    if "byte_range" not in detail:
        return
    skip_lo, skip_hi = detail.get("identity_records", (0, 0))
    data = _read_range(storage.join(part.root, "train.idx"), *detail["byte_range"])
    for k, raw in enumerate(io.BytesIO(data)):
        line_no = detail["first_line"] + k
        try:
            index, offset = _parse_idx_line(raw)
        except ValueError:
            yield line_no, _bad_idx_line(line_no, raw)
            continue
        if "identity_records" in detail and (index == 0 or skip_lo <= index < skip_hi):
            continue  # the header and identity records describe the images; they are not ones
        yield index, offset, line_no


def read_insightface_rec(part: Partition) -> Iterator[RawSample]:
    rec_uri = storage.join(part.root, "train.rec")
    with storage.open_input(rec_uri) as fh:
        for entry in _rec_entries(part):
            if len(entry) == 2:
                line_no, detail = entry
                yield RawSample(f"idx-line:{line_no}", "", detail, reject=("corrupt_index", detail))
                continue
            idx, offset, line_no = entry
            where = f"train.rec#{idx} (train.idx:{line_no})"
            try:
                _, labels, _, payload = unpack_record(read_record(fh, offset))
                label = int(labels[0])
            except (RecordIOError, ValueError, OverflowError) as exc:  # a NaN or infinite label too
                yield RawSample(f"rec:{idx}", "", where, reject=("corrupt_record", f"{where}: {exc}"))
                continue
            yield RawSample(f"rec:{idx}", str(label), where, data=payload, aligned=True)


def plan(fmt: str, root: str, per_partition: int) -> list[Partition]:
    """Partitions of about `per_partition` records of `root`, raw data in format `fmt`
    (folder formats: whole identities, at about IMAGES_PER_IDENTITY_GUESS images each)."""
    return load(get_format(fmt).planner)(root, per_partition)


def input_stamp(part: Partition) -> str:
    """A digest of what a partition reads, from listings alone: every file's name, size and
    modification time (each file and folder its format's `inputs` names: identity folders for
    folder formats, the container files otherwise). A finished partition is reused only
    while this is unchanged."""
    h = hashlib.sha256()

    def listing(uri: str) -> None:
        try:
            infos = sorted(_listdir(uri), key=lambda i: i.path)
        except (FileNotFoundError, OSError):
            h.update(f"{uri}|missing\n".encode())
            return
        for i in infos:
            h.update(f"{i.path}|{i.type}|{i.size}|{i.mtime_ns}\n".encode())

    def one_file(uri: str) -> None:
        fs, path = storage.resolve(uri)
        i = fs.get_file_info(path)
        h.update(f"{path}|{i.type}|{i.size}|{i.mtime_ns}\n".encode())

    add = {"listing": listing, "file": one_file}
    for kind, uri in load(get_format(part.format).inputs)(part):
        add[kind](uri)
    return h.hexdigest()


def read_partition(part: Partition) -> Iterator[RawSample]:
    records = load(get_format(part.format).reader)(part)
    if part.subset is None:
        return records
    lo, hi = part.subset
    return itertools.islice(records, lo, hi)

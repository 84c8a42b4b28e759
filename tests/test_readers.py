"""Readers on hand-made raw files, including a RecordIO file from an independent writer."""

import base64
import struct

import cv2
import numpy as np
import pytest

from cleaning import readers
from cleaning.readers import REC_MAGIC, plan, read_partition

MAGIC = struct.pack("<I", REC_MAGIC)


def dmlc_write(fh, payload: bytes) -> int:
    """MXNet/dmlc RecordIO writer, written from the format description: a magic word that
    occurs (4-byte aligned) in the payload splits the record into continuation parts."""
    start = fh.tell()
    cuts, pos = [], 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == MAGIC:
            cuts.append((pos, i))
            pos = i + 4
    parts = cuts + [(pos, len(payload))]
    for n, (a, b) in enumerate(parts):
        flag = 0 if len(parts) == 1 else (1 if n == 0 else (3 if n == len(parts) - 1 else 2))
        fh.write(MAGIC + struct.pack("<I", (flag << 29) | (b - a)) + payload[a:b])
        fh.write(b"\0" * ((4 - (b - a) % 4) % 4))
    return start


def pack(label, body: bytes, labels=None) -> bytes:
    if labels is not None:
        return struct.pack("<IfQQ", len(labels), 0.0, 0, 0) + np.asarray(labels, np.float32).tobytes() + body
    return struct.pack("<IfQQ", 0, float(label), 0, 0) + body


@pytest.fixture
def rec_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for i in range(6):
        img = rng.integers(0, 255, (112, 112, 3), np.uint8)
        data = cv2.imencode(".jpg", img)[1].tobytes()
        if i == 2:  # force continuation records: the magic word inside the payload, twice
            data = data[:100] + MAGIC + data[100:200] + MAGIC + data[200:]
        images.append((i % 3, data))
    offsets = {}
    with open(tmp_path / "train.rec", "wb") as fh:
        offsets[0] = dmlc_write(fh, pack(0, b"", labels=[len(images) + 1, len(images) + 4]))
        for n, (label, data) in enumerate(images, start=1):
            offsets[n] = dmlc_write(fh, pack(label, data))
        for k in range(3):  # identity records: not images
            offsets[len(images) + 1 + k] = dmlc_write(fh, pack(0, b"", labels=[1 + 2 * k, 3 + 2 * k]))
    lines = [f"{i}\t{off}" for i, off in sorted(offsets.items())]
    lines.insert(3, "garbage line")
    (tmp_path / "train.idx").write_text("\n".join(lines) + "\n")
    (tmp_path / "property").write_text("3,112,112")
    return tmp_path, images


def test_rec_roundtrip_with_continuation_records(rec_dataset):
    root, images = rec_dataset
    samples = [s for p in plan("insightface-rec", str(root), 4) for s in read_partition(p)]
    good = [s for s in samples if s.reject is None]
    assert [(int(s.identity), s.data) for s in good] == [(label, data) for label, data in images]
    assert all(s.aligned for s in good)
    bad = [s for s in samples if s.reject]
    assert len(bad) == 1 and bad[0].reject[0] == "corrupt_index" and "train.idx:4" in bad[0].reject[1]


def test_rec_corrupt_record_is_a_reject(rec_dataset):
    root, _ = rec_dataset
    data = bytearray((root / "train.rec").read_bytes())
    lines = (root / "train.idx").read_text().splitlines()
    offset = int(next(l for l in lines if l.startswith("5\t")).split("\t")[1])
    data[offset:offset + 4] = b"XXXX"
    (root / "train.rec").write_bytes(bytes(data))
    samples = [s for p in plan("insightface-rec", str(root), 100) for s in read_partition(p)]
    corrupt = [s for s in samples if s.reject and s.reject[0] == "corrupt_record"]
    assert len(corrupt) == 1 and "train.rec#5" in corrupt[0].reject[1] and "bad magic" in corrupt[0].reject[1]
    assert len(samples) == 7  # 6 images + the bad idx line: nothing silently lost


def _outcomes(root, per_partition):
    """key -> identity, or the reject reason, of everything the partitions read."""
    got = {}
    for part in plan("insightface-rec", str(root), per_partition):
        for s in read_partition(part):
            assert s.key not in got, f"{s.key} read twice"
            got[s.key] = s.reject[0] if s.reject else s.identity
    return got


def test_rec_plan_holds_no_record_list_and_matches_the_in_memory_plan(rec_dataset):
    """The driver's plan is byte ranges of train.idx (one per partition, whatever the
    record count); what the workers read from it is exactly what the in-memory plan reads."""
    root, _ = rec_dataset
    streamed = plan("insightface-rec", str(root), 2)
    assert all("byte_range" in p.detail and "records" not in p.detail for p in streamed)
    with open(root / "train.rec", "rb") as fh:
        in_memory = readers._plan_rec_in_memory(str(root), str(root / "train.idx"), fh, 2)
    assert [sorted(s.key for s in read_partition(p)) for p in streamed] == \
        [sorted(s.key for s in read_partition(p)) for p in in_memory]


def test_rec_index_out_of_order_or_repeated_loses_nothing(rec_dataset):
    """An index not in record order is planned in memory; a record listed twice is read once
    and the second line rejected; a record past the identity records is read as an image."""
    root, images = rec_dataset
    expected = _outcomes(root, 100)
    lines = (root / "train.idx").read_text().splitlines()
    shuffled = [lines[0]] + lines[1:][::-1]  # the garbage line (4th) moves to the 9th
    (root / "train.idx").write_text("\n".join(shuffled) + "\n")
    got = _outcomes(root, 2)
    assert got.pop("idx-line:9") == "corrupt_index" and got | {"idx-line:4": "corrupt_index"} == expected
    (root / "train.idx").write_text("\n".join(lines + [lines[2]]) + "\n")
    got = _outcomes(root, 2)
    assert got.pop(f"idx-line:{len(lines) + 1}") == "corrupt_index" and got == expected
    # A record after the identity records (index 10 of a header that ends them at 10).
    with open(root / "train.rec", "ab") as fh:
        fh.write(b"\0" * ((-fh.tell()) % 4))
        offset = dmlc_write(fh, pack(7, images[0][1]))
    (root / "train.idx").write_text("\n".join(lines + [f"10\t{offset}"]) + "\n")
    assert _outcomes(root, 2) == expected | {"rec:10": "7"}


def test_msceleb_rows_never_crash(tmp_path):
    img = cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))[1].tobytes()
    rect = base64.b64encode(struct.pack("<4f", 0.1, 0.1, 0.5, 0.5)).decode()
    good = ["m.01", "1", "u", "p", "f1", rect, base64.b64encode(img).decode()]
    rows = ["\t".join(good), "\t".join(good[:5]), "\t".join(good[:6] + ["%%%"]),
            "\t".join(["../etc"] + good[1:]), "\t".join(good[:5] + ["AAAA"] + good[6:]), ""]
    (tmp_path / "x.tsv").write_text("\n".join(rows) + "\n")
    samples = [s for p in plan("msceleb-tsv", str(tmp_path), 2) for s in read_partition(p)]
    reasons = [s.reject[0] if s.reject else "ok" for s in samples]
    assert reasons == ["ok", "malformed_row", "invalid_base64", "unsafe_identity", "malformed_row", "malformed_row"]
    assert "x.tsv:2" in samples[1].reject[1]


def test_image_folder_odd_files(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "a.jpg").write_bytes(b"")
    (tmp_path / "alice" / "notes.txt").write_text("hi")
    (tmp_path / "bad name!").mkdir()
    (tmp_path / "bad name!" / "b.jpg").write_bytes(b"x")
    samples = [s for p in plan("image-folder", str(tmp_path), 100) for s in read_partition(p)]
    assert {(s.key, s.reject[0] if s.reject else "ok") for s in samples} == {
        ("alice/a.jpg", "ok"), ("alice/notes.txt", "not_an_image_file"), ("bad name!/b.jpg", "unsafe_identity")}


@pytest.mark.parametrize("name, ok", [("n000001", True), ("m.0abc", True), ("..", False), ("../x", False),
                                      ("a/b", False), ("a\\b", False), ("", False)])
def test_safe_identity(name, ok):
    assert readers.safe_identity(name) is ok


def test_our_recordio_writer_reads_back(tmp_path):
    from cleaning.formats.recordio import write_rec
    from cleaning.readers import read_record, unpack_record

    rng = np.random.default_rng(1)
    bodies = [cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), np.uint8))[1].tobytes() for _ in range(4)]
    bodies[1] = bodies[1][:64] + MAGIC + bodies[1][64:]  # aligned magic inside: a split record
    assert write_rec(str(tmp_path / "x"), [(i * 10, b) for i, b in enumerate(bodies)]) == 4
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "x.idx").read_text().splitlines()]
    with open(tmp_path / "x.rec", "rb") as fh:
        for i, off in enumerate(offsets):
            flag, labels, _, payload = unpack_record(read_record(fh, off))
            assert labels[0] == i * 10 and payload == bodies[i]


def test_rec_plan_and_read_on_s3(rec_dataset, s3_bucket):
    """The streamed RecordIO plan and its workers' reads (byte ranges of train.idx, records
    by offset) on S3 through the local endpoint: the same records as on local disk."""
    from dataset import storage

    root, _ = rec_dataset
    remote = f"s3://{s3_bucket}/faces_emore"
    for name in ("train.rec", "train.idx", "property"):
        storage.write_bytes(storage.join(remote, name), (root / name).read_bytes())
    local, on_s3 = _outcomes(root, 2), _outcomes(remote, 2)
    assert on_s3 == local and len(on_s3) == 7
    assert all("byte_range" in p.detail and "records" not in p.detail for p in plan("insightface-rec", remote, 2))

"""insightface RecordIO (MS1MV2/MS1MV3 `faces_emore`) through stage 1, end to end: records
built with our writer in insightface's layout, partitions of whole identities, pre-aligned
faces kept byte for byte, duplicates found within an identity wherever it falls."""

import json
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaning.align import ARCFACE_TEMPLATE
from cleaning.formats.recordio import pack_record, write_record, write_rec
from cleaning import readers
from cleaning.readers import IR_HEADER, REC_MAGIC, plan, read_partition
from dataset import RefinedDataset
from pipelines.stage1_dask import CleanConfig, run_stage1

ROOT = Path(__file__).resolve().parents[1]


def _face(seed: int) -> bytes:
    """A distinct aligned-looking 112x112 JPEG (smooth random texture: a sharp, unique crop)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
    img = cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)
    img = cv2.add(img, rng.integers(0, 40, (112, 112, 3), dtype=np.uint8))
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _with_magic(seed: int) -> bytes:
    """A valid JPEG whose bytes contain the RecordIO magic word 4-byte aligned (in a COM segment)."""
    data = _face(seed)
    magic = struct.pack("<I", REC_MAGIC)
    pad = (-(IR_HEADER.size + 4 + 2) % 4)
    comment = b"\xff\xfe" + struct.pack(">H", 2 + pad + 8) + b"x" * pad + magic + magic
    return data[:2] + comment + data[2:]


@pytest.fixture
def rec_set(tmp_path):
    """4 identities of 3 images; identity 1's third image is an exact copy of its first,
    and a record's payload holds the magic word."""
    items = []
    for label in range(4):
        for k in range(3):
            items.append((label, _face(100 * label + k)))
    items[5] = (1, items[3][1])  # exact duplicate inside identity 1 (records 4 and 6)
    items[7] = (2, _with_magic(7))
    root = tmp_path / "faces_emore"
    root.mkdir()
    assert write_rec(root, items) == 12
    return root, items


def test_plan_cuts_only_at_identity_boundaries(rec_set):
    root, items = rec_set
    for per_partition in (1, 2, 4, 5, 100):
        parts = plan("insightface-rec", str(root), per_partition)
        seen = []
        for part in parts:
            labels = [s.identity for s in read_partition(part)]
            assert labels == sorted(labels)
            seen.append(set(labels))
        for a in range(len(seen)):
            for b in range(a):
                assert not seen[a] & seen[b], (per_partition, seen)
        assert sum(len(s) for s in seen) == 4 and sum(1 for p in parts for _ in read_partition(p)) == 12
        # The driver holds no per-record list.
        assert all("records" not in p.detail and "byte_range" in p.detail for p in parts)


def _idx_keys(root) -> list[int]:
    return [int(line.split("\t")[0]) for line in (Path(root) / "train.idx").read_text().splitlines()]


def _partition_contents(root, per_partition) -> list[list[tuple[str, str, bytes]]]:
    """(key, identity or reject reason, payload) of each partition's records, in reading order."""
    return [[(s.key, s.reject[0] if s.reject else s.identity, s.data) for s in read_partition(p)]
            for p in plan("insightface-rec", str(root), per_partition)]


def _in_memory_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "planning with the whole index in memory" in r.getMessage()]


@pytest.fixture
def face2rec2_set(tmp_path, rec_set):
    """rec_set written as insightface's face2rec2.py writes it: images 1..12, then record 0
    and the identity records 13..16, in train.rec and in train.idx."""
    _, items = rec_set
    root = tmp_path / "face2rec2"
    root.mkdir()
    assert write_rec(root, items, order="face2rec2") == 12
    return root


def test_face2rec2_order_takes_the_streamed_planner(rec_set, face2rec2_set, caplog):
    """A train.idx listing images first and the header and identity records after them is
    planned from byte ranges of the index (no record list in the driver), and each partition
    reads exactly what the same partition of the in-order file reads."""
    in_order, _ = rec_set
    assert _idx_keys(face2rec2_set) == list(range(1, 13)) + [0] + list(range(13, 17))
    offsets = dict((k, int(line.split("\t")[1])) for k, line in
                   zip(_idx_keys(face2rec2_set), (face2rec2_set / "train.idx").read_text().splitlines()))
    assert offsets[0] > offsets[12]  # the header record really comes after the images in train.rec
    for per_partition in (1, 2, 4, 5, 100):
        parts = plan("insightface-rec", str(face2rec2_set), per_partition)
        assert all("byte_range" in p.detail and "records" not in p.detail for p in parts)
        assert _partition_contents(face2rec2_set, per_partition) == _partition_contents(in_order, per_partition)
    assert not _in_memory_warnings(caplog)


def test_index_runs_that_cannot_be_streamed_are_planned_in_memory(rec_set, face2rec2_set, caplog, monkeypatch):
    """Indexes in other run layouts: records left out and identity records listed before
    record 0 are still streamed; what the run planner refuses goes to the in-memory planner
    with the reason and loses nothing: an identity split between two stretches, a record
    listed twice (its second line is rejected), too many runs."""
    in_order, _ = rec_set
    expected = _partition_contents(in_order, 100)[0]
    lines = dict(zip(_idx_keys(face2rec2_set), (face2rec2_set / "train.idx").read_text().splitlines()))

    def rewrite_idx(keys: list[int]) -> None:
        (face2rec2_set / "train.idx").write_text("".join(lines[k] + "\n" for k in keys))

    def outcomes(per_partition=2):
        return sorted(x for part in _partition_contents(face2rec2_set, per_partition) for x in part)

    # face2rec2 leaves out an image it cannot read: a gap splits a run, not a stretch; streamed.
    rewrite_idx([k for k in list(range(1, 13)) + [0] + list(range(13, 17)) if k not in (4, 5)])
    assert outcomes() == sorted(x for x in expected if x[0] not in ("rec:4", "rec:5"))
    assert not _in_memory_warnings(caplog)
    # Runs 7..16 and 0..6: identity 2 starts record 7, so no identity is split; streamed.
    rewrite_idx(list(range(7, 17)) + list(range(0, 7)))
    assert outcomes() == sorted(expected) and not _in_memory_warnings(caplog)
    streamed = plan("insightface-rec", str(face2rec2_set), 2)
    assert all("byte_range" in p.detail and "records" not in p.detail for p in streamed)
    # Runs 5..16 and 0..4: identity 1 (records 4..6) lies in both.
    rewrite_idx(list(range(5, 17)) + list(range(0, 5)))
    assert outcomes() == sorted(expected)
    assert "identity [4, 7) are listed in two places" in _in_memory_warnings(caplog)[-1]
    # face2rec2 order with image record 3 listed again at the end.
    rewrite_idx(list(range(1, 13)) + [0] + list(range(13, 17)) + [3])
    got = outcomes()
    repeat = ("idx-line:18", "corrupt_index", None)
    assert repeat in got and sorted(set(got) - {repeat}) == sorted(expected)
    assert "record 3 is listed twice" in _in_memory_warnings(caplog)[-1]
    details = [s.reject[1] for p in plan("insightface-rec", str(face2rec2_set), 2) for s in read_partition(p) if s.reject]
    assert details == ["train.idx:18: record 3 is listed twice"]
    # Scrambled: identities in pieces, and more runs than the streamed planner keeps.
    rewrite_idx([0, 16, 2, 15, 4, 14, 6, 13, 8, 1, 10, 3, 12, 5, 7, 9, 11])
    assert outcomes() == sorted(expected)
    assert "identity [1, 4) are listed in two places" in _in_memory_warnings(caplog)[-1]
    monkeypatch.setattr(readers, "_MAX_RUNS", 8)
    assert outcomes() == sorted(expected)
    assert "over 8 runs of consecutive indices" in _in_memory_warnings(caplog)[-1]


def test_face2rec2_plan_and_read_on_s3(face2rec2_set, s3_bucket, caplog):
    """The streamed plan of a face2rec2-order index and its workers' reads on S3 (local
    endpoint); the .bin sets beside train.rec there are the source's evaluation sets."""
    from dataset import storage
    from dataset.refined import describe_source

    remote = f"s3://{s3_bucket}/faces_emore"
    for name in ("train.rec", "train.idx", "property"):
        storage.write_bytes(storage.join(remote, name), (face2rec2_set / name).read_bytes())
    assert _partition_contents(remote, 4) == _partition_contents(face2rec2_set, 4)
    assert all("byte_range" in p.detail and "records" not in p.detail for p in plan("insightface-rec", remote, 4))
    assert not _in_memory_warnings(caplog)
    assert describe_source("insightface-rec", remote) == {"format": "insightface-rec", "uri": remote}
    for name in ("lfw.bin", "agedb_30.bin", "notes.txt"):
        storage.write_bytes(storage.join(remote, name), b"x")
    assert describe_source("insightface-rec", remote + "/")["eval_sets"] == [f"{remote}/agedb_30.bin",
                                                                             f"{remote}/lfw.bin"]
    assert "eval_sets" not in describe_source("image-folder", remote)  # a .bin there is not a layout's set


def test_headerless_file_is_cut_where_the_label_changes(tmp_path):
    items = [(label, _face(10 * label + k)) for label in (0, 0, 1, 1, 1, 2) for k in (0,)]
    prefix = tmp_path / "train"
    write_rec(str(prefix), items)  # im2rec style: images only, from index 0
    parts = plan("insightface-rec", str(tmp_path), 2)
    groups = [[s.identity for s in read_partition(p)] for p in parts]
    assert groups == [["0", "0"], ["1", "1", "1"], ["2"]]


def test_clean_data_on_recordio(tmp_path, rec_set):
    root, items = rec_set
    # 2 records per partition: a count-based cut would put records 4 and 6 (identity 1's
    # original and its copy) in different partitions.
    out = run_stage1(str(root), "insightface-rec", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(records_per_partition=2, workers=1, min_blur=0.0))
    m = out.manifest
    assert m.counts["read"] == 12 == m.counts["kept"] + m.counts["rejected"]
    assert m.counts["by_reason"] == {"exact_duplicate/exact_duplicate": 1}
    table = pq.read_table(tmp_path / "out" / "shards").to_pydict()
    # One label per identity, contiguous; the identity is the record's class label.
    assert sorted(set(zip(table["identity"], table["label"]))) == [("0", 0), ("1", 1), ("2", 2), ("3", 3)]
    # Pre-aligned 112x112 JPEGs are kept byte for byte (no re-encoding), the magic word included.
    payloads = {f"rec:{i + 1}": data for i, (_, data) in enumerate(items)}
    assert all(img == payloads[key] for key, img in zip(table["key"], table["image"]))
    assert payloads["rec:8"] in table["image"]
    # The landmarks recorded are the template's, and say so.
    assert set(table["face_choice"]) == {"pre_aligned"}
    np.testing.assert_allclose(np.array(table["landmarks"][0]).reshape(5, 2), ARCFACE_TEMPLATE, atol=1e-4)
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pydict()
    assert rejects["key"] == ["rec:6"] and "same bytes as rec:4" in rejects["detail"][0]


def test_other_sizes_converted_once_and_bad_records_rejected(tmp_path):
    big = cv2.imencode(".png", cv2.resize(cv2.imdecode(np.frombuffer(_face(1), np.uint8), cv2.IMREAD_COLOR),
                                          (224, 224)))[1].tobytes()
    wide = cv2.imencode(".jpg", np.zeros((112, 96, 3), np.uint8))[1].tobytes()
    items = [(0, _face(0)), (0, big), (1, wide), (1, b""), (1, b"not an image")]
    root = tmp_path / "rec"
    root.mkdir()
    write_rec(root, items)
    out = run_stage1(str(root), "insightface-rec", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(workers=1, min_blur=0.0))
    got = pq.read_table(tmp_path / "out" / "rejects").to_pydict()
    assert dict(zip(got["key"], got["reason"])) == {"rec:3": "not_aligned_112", "rec:4": "empty_file",
                                                     "rec:5": "undecodable"}
    kept = pq.read_table(tmp_path / "out" / "shards").to_pydict()
    assert kept["key"] == ["rec:1", "rec:2"]
    converted = cv2.imdecode(np.frombuffer(kept["image"][1], np.uint8), cv2.IMREAD_COLOR)
    assert converted.shape == (112, 112, 3) and kept["image"][1][:2] == b"\xff\xd8"  # 224 PNG -> 112 JPEG
    assert out.manifest.counts["read"] == 5


def test_every_input_rejected_gives_a_valid_empty_dataset(tmp_path):
    raw = tmp_path / "raw" / "alice"
    raw.mkdir(parents=True)
    (raw / "a.jpg").write_bytes(b"")
    out = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(workers=1))
    again = RefinedDataset.open(out.uri).manifest
    assert again.num_images == 0 and again.num_classes == 0
    assert again.counts == {**again.counts, "read": 1, "kept": 0, "rejected": 1}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["by_reason"] == {
        "decode/empty_file": 1}


def test_a_broken_record_costs_one_reject(tmp_path):
    items = [(0, _face(0)), (0, _face(1)), (1, _face(2))]
    root = tmp_path / "rec"
    root.mkdir()
    write_rec(root, items)
    data = bytearray((root / "train.rec").read_bytes())
    offsets = [int(line.split("\t")[1]) for line in (root / "train.idx").read_text().splitlines()]
    data[offsets[2]:offsets[2] + 4] = b"\0\0\0\0"  # record 2's magic word destroyed
    (root / "train.rec").write_bytes(bytes(data))
    out = run_stage1(str(root), "insightface-rec", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(workers=1, min_blur=0.0))
    got = pq.read_table(tmp_path / "out" / "rejects").to_pydict()
    assert dict(zip(got["key"], got["reason"])) == {"rec:2": "corrupt_record"}
    assert out.manifest.counts["kept"] == 2


def test_write_record_magic_roundtrip_helper():
    # Our framing splits a payload at an aligned magic word and the reader joins it back.
    import io

    from cleaning.readers import read_record

    record = pack_record(3.0, _with_magic(1))
    fh = io.BytesIO()
    write_record(fh, record)
    assert read_record(io.BytesIO(fh.getvalue()), 0) == record


def test_stage1_on_a_demo_in_either_record_order_gives_the_same_dataset(tmp_path):
    """The demo written in index order and in face2rec2's order: stage 1 keeps and rejects
    the same records with the same labels and bytes; only the idx line in `source` differs.
    The pair set insightface-style beside train.rec is recorded as the source's evaluation set."""
    from cleaning.synthetic.demo import DemoConfig, generate, input_root

    tables = {}
    for order in ("index", "face2rec2"):
        raw = tmp_path / order
        generate(raw, DemoConfig(identities=10, images_per_identity=6, seed=4, eval_identities=4, eval_pairs=20,
                                 ijb_subjects=0, rec_order=order, workers=1), ["insightface-rec"])
        root = input_root(raw, "insightface-rec")
        images = json.loads((raw / "ground_truth.json").read_text())["num_records"]
        keys = _idx_keys(root)
        assert keys[0 if order == "index" else images] == 0 and sorted(keys) == list(range(len(keys)))
        out = run_stage1(str(root), "insightface-rec", RefinedDataset.create(tmp_path / f"out-{order}"),
                             CleanConfig(records_per_partition=15, workers=1))
        m = out.manifest
        assert m.source["eval_sets"] == [str(root / "demo_pairs.bin")]
        assert out.eval_sets()[0] == [str(root / "demo_pairs.bin")]
        kept = pq.read_table(tmp_path / f"out-{order}" / "shards").to_pydict()
        rejects = pq.read_table(tmp_path / f"out-{order}" / "rejects", columns=["key", "reason", "stage"]).to_pylist()
        sources = kept.pop("source")
        kept = {k: ["nan" if isinstance(v, float) and v != v else v for v in col] for k, col in kept.items()}  # no score
        assert all(s.startswith(f"train.rec#{k[4:]} (train.idx:") for k, s in zip(kept["key"], sources))
        tables[order] = (kept, sorted(rejects, key=lambda r: r["key"]), m.counts, m.identity_to_label)
    assert tables["face2rec2"] == tables["index"] and len(tables["index"][0]["key"]) > 40


def test_refine_on_a_demo_written_as_recordio(tmp_path):
    """`arcface clean-data --format insightface-rec` on a demo in face2rec2's record order: stage 1
    on the .rec, a bootstrap model, stage 2; every input accounted for, near duplicates of
    aligned faces found precisely, and the identities that overlap the pair set shipped
    beside train.rec (the only evaluation set here) removed."""
    import ray

    from cleaning.synthetic.demo import DemoConfig, generate, input_root
    from cleaning.synthetic.score import score_stage1, score_stage2
    from pipelines.cli import main

    raw = tmp_path / "raw"
    generate(raw, DemoConfig(identities=30, images_per_identity=14, seed=3, eval_identities=8, eval_pairs=80,
                             rec_order="face2rec2", workers=2), ["insightface-rec"])
    shutil.rmtree(raw / "eval")  # the demo's identification set: not part of insightface's layout
    try:
        code = main(["clean-data", "--input", str(input_root(raw, "insightface-rec")), "--format", "insightface-rec",
                     "--out", str(tmp_path / "out"), "--config", str(ROOT / "configs" / "demo-train.toml"),
                     "--set", "denoise.bootstrap_epochs=4", "--set", "clean.records_per_partition=100"])
    finally:
        ray.shutdown()
    assert code == 0
    truth = json.loads((raw / "ground_truth.json").read_text())
    stage2 = RefinedDataset.open(tmp_path / "out" / "stage2")
    c = stage2.manifest.counts
    assert c["read"] == truth["num_records"] == c["kept"] + c["rejected"]
    score = score_stage1(str(tmp_path / "out" / "stage1"), str(raw / "ground_truth.json"))
    assert score["per_defect"]["near_duplicate"]["precision"] >= 0.95, score["per_defect"]["near_duplicate"]
    assert score["per_defect"]["exact_duplicate"]["recall"] == 1.0
    assert score["missing"] == 0
    pair_set = str(input_root(raw, "insightface-rec") / "demo_pairs.bin")
    assert stage2.eval_sets() == ([pair_set], [])
    assert stage2.manifest.extra["stage2"]["evaluation_faces"] > 0
    overlap = score_stage2(stage2.uri, str(raw / "ground_truth.json"))["overlap_identities"]
    assert len(overlap["truth"]) == 3 and overlap["all_removed"], overlap

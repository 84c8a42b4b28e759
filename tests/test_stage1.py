"""Stage 1 end to end on Dask: demo data in every format, bad input, accounting, resume."""

import io
import json
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage
from PIL import Image

from cleaning.detect.weights import have_weights
from cleaning.synthetic.demo import FORMATS, input_root
from cleaning.synthetic.score import score_stage1
from dataset import RefinedDataset
from pipelines.stage1_dask import CleanConfig, run_stage1

pytestmark = pytest.mark.skipif(not have_weights(), reason="MTCNN weights not fetched (make setup)")


def small_config() -> CleanConfig:
    return CleanConfig(records_per_partition=120, workers=2)  # several partitions even on tiny data


def clean(src, fmt: str, out) -> dict:
    """Stage 1 of `src` into `out`; its manifest as a dict."""
    return run_stage1(str(src), fmt, RefinedDataset.create(out), small_config()).manifest.to_dict()


def rows(out: Path, folder: str) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (out / folder).glob("*.parquet"))


@pytest.fixture(scope="module")
def cleaned(demo_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    results = {}
    for fmt in FORMATS:
        src = input_root(demo_raw / fmt, fmt)
        manifest = clean(src, fmt, out / fmt)
        results[fmt] = (out / fmt, manifest, score_stage1(str(out / fmt), str(demo_raw / fmt / "ground_truth.json")))
    return results


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_accounted_for(cleaned, demo_raw, fmt):
    out, manifest, score = cleaned[fmt]
    truth = json.loads((demo_raw / fmt / "ground_truth.json").read_text())
    c = manifest["counts"]
    extra = 1 if fmt == "vggface2" else 0  # the annotation row for a missing image
    assert c["read"] == truth["num_records"] + extra
    assert c["read"] == c["kept"] + c["rejected"] == rows(out, "shards") + rows(out, "rejects")
    assert score["missing"] == 0
    assert sum(c["by_reason"].values()) == c["rejected"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_defects_rejected_with_the_right_reason(cleaned, fmt):
    _, _, score = cleaned[fmt]
    per = score["per_defect"]
    # (An aligned release such as insightface-rec holds no photo without a face.)
    for defect in ("undecodable", "zero_byte", "exact_duplicate", "no_face"):
        if defect == "no_face" and fmt == "insightface-rec":
            continue
        assert per[defect]["recall"] == 1.0, (defect, score["confusion"][defect])
    for defect in ("near_duplicate", "blurred", "tiny_face", "bad_annotation", "malformed_row"):
        if defect in per:
            # blurred/tiny faces the detector cannot find are rejected as no_face instead
            assert per[defect]["recall"] >= 0.6, (defect, score["confusion"][defect])
    for defect, figures in per.items():
        if defect != "no_face":  # the detector's misses on clean faces land there
            assert figures["precision"] >= 0.9, (defect, figures)
    assert score["clean_kept"] >= 0.9
    assert score["label_noise_kept"] >= 0.85  # stage 1 cannot see label noise; stage 2 does


def test_shards_and_manifest(cleaned):
    out, manifest, _ = cleaned["vggface2"]
    table = pq.read_table(out / "shards")
    assert table.schema.field("label").type == "int32"
    labels = table.column("label").to_numpy()
    assert set(labels.tolist()) == set(range(manifest["num_classes"]))
    mapping = manifest["identity_to_label"]
    assert all(mapping[i] == l for i, l in zip(table.column("identity").to_pylist(), labels.tolist()))
    img = cv2.imdecode(np.frombuffer(table.column("image")[0].as_py(), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (112, 112, 3)
    assert manifest["num_images"] == table.num_rows and len(manifest["content_hash"]) == 64
    assert (out / "report" / "index.html").exists()
    rejects = pq.read_table(out / "rejects")
    assert set(rejects.column("stage").to_pylist()) >= {"read", "decode", "blur"}


def test_rerun_resumes_and_reproduces(cleaned, demo_raw):
    out, manifest, _ = cleaned["vggface2"]
    staged = sorted((out / "staging").glob("*.json"))
    assert len(staged) >= 2
    before = {p: p.stat().st_mtime_ns for p in staged}
    # A crash after one partition's outputs were lost, before the manifest: rerun.
    staged[0].unlink()
    (out / "manifest.json").unlink()
    environment = dict(os.environ)
    again = clean(demo_raw / "vggface2", "vggface2", out)
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ & co. in its parent; they must not leak into
    # what runs next in this process (Ray workers ran 2.7x slower with them).
    assert dict(os.environ) == environment
    assert again["content_hash"] == manifest["content_hash"]
    assert again["counts"] == manifest["counts"]
    for p in staged[1:]:
        assert p.stat().st_mtime_ns == before[p], "finished partitions are not redone"
    assert not list(out.rglob("*.tmp-*")), "no temporary files left behind"


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG file that declares huge dimensions (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width) * 4)  # a few rows of zeros; the rest is promised
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_and_unusual_images(tmp_path):
    face = cv2.imread(str(Path(skimage.__file__).parent / "data" / "astronaut.png"))
    person = tmp_path / "raw" / "astronaut"
    person.mkdir(parents=True)
    gray = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(person / "gray.png"), gray)
    cv2.imwrite(str(person / "rgba.png"), cv2.cvtColor(face, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(person / "deep.png"), (gray.astype(np.uint16) * 257))
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(face, cv2.COLOR_BGR2RGB)).convert("CMYK").save(buf, "JPEG")
    (person / "cmyk.jpg").write_bytes(buf.getvalue())
    (person / "bomb.png").write_bytes(_png_bomb(30000, 30000))
    ok = cv2.imencode(".jpg", face)[1].tobytes()
    (person / "truncated.jpg").write_bytes(ok[: len(ok) // 2])
    (person / "text.jpg").write_text("this is not an image")
    manifest = clean(tmp_path / "raw", "image-folder", tmp_path / "out")
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pydict()
    got = dict(zip(rejects["key"], rejects["reason"]))
    assert {k: v for k, v in got.items() if v != "near_duplicate"} == {
        "astronaut/bomb.png": "too_many_pixels", "astronaut/truncated.jpg": "truncated",
        "astronaut/text.jpg": "undecodable"}
    kept = pq.read_table(tmp_path / "out" / "shards").column("key").to_pylist()
    assert kept == ["astronaut/cmyk.jpg"]
    # Grey, RGBA and 16-bit files decode, are detected and aligned, and are then found to be
    # the same photo as the CMYK one (near duplicates: the last step), not decoding failures.
    assert {k for k, v in got.items() if v == "near_duplicate"} == {
        "astronaut/deep.png", "astronaut/gray.png", "astronaut/rgba.png"}
    assert manifest["counts"]["read"] == 7 == len(kept) + len(got)


def test_a_face_that_cannot_be_written_is_a_reject_with_its_source_bytes(monkeypatch):
    """Encoding a kept face raises (injected): the face is rejected as write/internal_error,
    its reject keeps the source bytes, and the tables stay whole."""
    import numpy as np

    from cleaning import stage1
    from cleaning.readers import RawSample
    from cleaning.steps import Face, StepChain

    def broken(image, quality):
        raise MemoryError("encoder out of memory")

    monkeypatch.setattr(stage1, "_jpeg", broken)
    tables = stage1._Tables(95)
    face = Face(RawSample("a/1.jpg", "a", "/in/a/1.jpg", data=b"source bytes"))
    face.aligned, face.landmarks = np.zeros((112, 112, 3), np.uint8), np.zeros((5, 2), np.float32)
    stage1._finish_chunk([face], StepChain(), None, tables)
    kept, rejects = tables.tables()
    assert kept.num_rows == 0 and rejects.num_rows == 1
    row = rejects.to_pylist()[0]
    assert (row["stage"], row["reason"]) == ("write", "internal_error")
    assert "MemoryError in writing the kept face: encoder out of memory" in row["detail"]
    assert row["image"] == b"source bytes"

"""The demo raw data, parsed back with independent code (csv, base64, struct, cv2.imdecode)."""

import base64
import binascii
import csv
import hashlib
import json
import pickle
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from cleaning.formats.insightface_bin import BinFormatError, UnsafePickleError, loads_pairs


def _truth(root: Path, fmt: str) -> dict:
    return json.loads((root / fmt / "ground_truth.json").read_text())


def _decodes(data: bytes) -> bool:
    return len(data) > 0 and cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def _landmarks_on_features(img: np.ndarray, lm: np.ndarray) -> bool:
    """Eyes (iris/pupil) and the lip line are darker than the cheeks below the eyes."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(float)
    eye_dist = np.linalg.norm(lm[1] - lm[0])
    down = (lm[3] - lm[0]) / np.linalg.norm(lm[3] - lm[0])  # roughly "down the face"

    def patch(p):
        x, y = int(round(p[0])), int(round(p[1]))
        return gray[y - 1:y + 2, x - 1:x + 2].mean()

    cheeks = [patch(lm[k] + down * 0.35 * eye_dist) for k in (0, 1)]
    eyes = [patch(lm[k]) for k in (0, 1)]
    mouth_mid = patch((lm[3] + lm[4]) / 2 + down * 0.02 * eye_dist)
    return max(eyes) < min(cheeks) and mouth_mid < min(cheeks)


def test_vggface2_layout_parses_with_csv(demo_raw):
    root = demo_raw / "vggface2"
    truth = _truth(demo_raw, "vggface2")
    by_key = {r["key"]: r for r in truth["images"]}
    files = sorted(p.relative_to(root / "train").with_suffix("").as_posix() for p in (root / "train").rglob("*.jpg"))
    assert files == sorted(by_key), "ground truth lists exactly the image files"

    with open(root / "bb_landmark" / "loose_bb_train.csv", newline="") as fh:
        bb_rows = list(csv.reader(fh))
    with open(root / "bb_landmark" / "loose_landmark_train.csv", newline="") as fh:
        lm_rows = list(csv.reader(fh))
    assert bb_rows[0] == ["NAME_ID", "X", "Y", "W", "H"]
    assert lm_rows[0][:3] == ["NAME_ID", "P1X", "P1Y"] and len(lm_rows[0]) == 11

    malformed = {(m["file"], m["line"]) for m in truth["malformed_rows"]}
    found_bad, checked = set(), 0
    for name, rows, width in (("loose_bb_train.csv", bb_rows, 5), ("loose_landmark_train.csv", lm_rows, 11)):
        for line, row in enumerate(rows[1:], start=2):
            try:
                values = [float(v) for v in row[1:]]
                ok = len(row) == width and row[0] in by_key and all(0 <= v <= 250 for v in values)
            except ValueError:
                ok = False
            if not ok:
                found_bad.add((f"bb_landmark/{name}", line))
            elif name == "loose_landmark_train.csv":
                rec = by_key[row[0]]
                lm = np.array(values).reshape(5, 2)
                assert np.allclose(lm, rec["landmarks"], atol=0.01)
                if not rec["defects"]:
                    img = cv2.imread(str(root / "train" / f"{row[0]}.jpg"))
                    checked += _landmarks_on_features(img, lm)
    assert found_bad == malformed, "every malformed row is in the ground truth, and nothing else is"
    clean = sum(1 for r in truth["images"] if not r["defects"])
    assert checked >= 0.95 * clean, f"landmarks on drawn features in only {checked}/{clean} clean images"

    meta = (root / "identity_meta.csv").read_text().splitlines()
    assert meta[0] == "Class_ID, Name, Sample_Num, Flag, Gender"
    assert len(meta) - 1 == len({r["filed_identity"] for r in truth["images"]})


def test_msceleb_tsv_parses_with_base64(demo_raw):
    root = demo_raw / "msceleb-tsv"
    truth = _truth(demo_raw, "msceleb-tsv")
    lines = (root / "FaceImageCroppedWithAlignment.tsv").read_text().splitlines()
    assert len(lines) == truth["num_records"] == len(truth["images"])
    malformed = {m["line"]: m["kind"] for m in truth["malformed_rows"]}
    by_line = {r["line"]: r for r in truth["images"]}
    bad = {}
    for line_no, line in enumerate(lines, start=1):
        cols = line.split("\t")
        if len(cols) != 7:
            bad[line_no] = "missing_columns"
            continue
        if "/" in cols[0] or ".." in cols[0]:
            bad[line_no] = "unsafe_identity"
            continue
        try:
            data = base64.b64decode(cols[6], validate=True)
        except binascii.Error:
            bad[line_no] = "invalid_base64"
            continue
        rect = base64.b64decode(cols[5])
        if len(rect) != 16:
            bad[line_no] = "bad_face_rectangle"
            continue
        rec = by_line[line_no]
        assert cols[0] == rec["filed_identity"]
        assert _decodes(data) == (not ({"undecodable", "zero_byte"} & set(rec["defects"])))
        if rec["box"] is not None:
            x, y, w, h = struct.unpack("<4f", rect)
            assert np.allclose(np.array([x, y, w, h]) * 250, rec["box"], atol=0.01)
    assert bad == malformed
    assert set(malformed.values()) == {"missing_columns", "invalid_base64", "bad_face_rectangle", "unsafe_identity"}


def test_image_folder_defects_match_files(demo_raw):
    root = demo_raw / "image-folder"
    truth = _truth(demo_raw, "image-folder")
    hashes = defaultdict(list)
    for rec in truth["images"]:
        data = (root / rec["file"]).read_bytes()
        broken = {"undecodable", "zero_byte"} & set(rec["defects"])
        assert _decodes(data) == (not broken), rec
        if "zero_byte" in rec["defects"]:
            assert data == b""
        if data:
            hashes[(rec["filed_identity"], hashlib.sha256(data).hexdigest())].append(rec)
    # Exact duplicates: every byte-identical pair in an identity is flagged, and every flag has its twin.
    for group in hashes.values():
        flagged = [r for r in group if "exact_duplicate" in r["defects"]]
        assert len(flagged) == len(group) - 1
    n_flagged = sum("exact_duplicate" in r["defects"] for r in truth["images"])
    assert n_flagged == sum(len(g) - 1 for g in hashes.values())


def test_every_defect_kind_is_injected_and_counted(demo_raw):
    for fmt in ("vggface2", "msceleb-tsv", "image-folder"):
        truth = _truth(demo_raw, fmt)
        counts = truth["defect_counts"]
        for defect in ("label_noise", "exact_duplicate", "near_duplicate", "undecodable", "zero_byte",
                       "no_face", "tiny_face", "blurred"):
            assert counts.get(defect, 0) >= 1, (fmt, defect)
        assert sum(counts.values()) >= truth["num_records"]
        for rec in truth["images"]:
            if "label_noise" in rec["defects"]:
                assert rec["true_identity"] != rec["filed_identity"]
            elif rec["true_identity"] is not None:
                dup = {a: o for a, o in truth["duplicate_identities"]}
                assert dup.get(rec["filed_identity"], rec["filed_identity"]) == rec["true_identity"]
        assert len(truth["duplicate_identities"]) == 2
        assert len(truth["eval_overlap_identities"]) == 3


def test_tiny_and_blurred_faces_are_what_they_say(demo_raw):
    root = demo_raw / "image-folder"
    truth = _truth(demo_raw, "image-folder")
    sharp, blurred = [], []
    for rec in truth["images"]:
        if "tiny_face" in rec["defects"]:
            lm = np.array(rec["landmarks"])
            assert np.linalg.norm(lm[1] - lm[0]) < 12
        if rec["landmarks"] and ("blurred" in rec["defects"] or not rec["defects"]):
            img = cv2.imread(str(root / rec["file"]), cv2.IMREAD_GRAYSCALE)
            x, y, w, h = (int(v) for v in rec["box"])
            score = cv2.Laplacian(img[y:y + h, x:x + w], cv2.CV_64F).var()
            (blurred if rec["defects"] else sharp).append(score)
    assert blurred and max(blurred) < np.median(sharp) / 4


def test_eval_pairs_bin_is_insightface_format(demo_raw):
    truth = _truth(demo_raw, "vggface2")
    data = (demo_raw / "vggface2" / "eval" / "demo_pairs.bin").read_bytes()
    images, issame = loads_pairs(data)
    # The plain (unrestricted) reading gives the same thing: it is a standard pickle.
    raw_bins, raw_issame = pickle.loads(data)
    assert images == raw_bins and issame == raw_issame
    assert len(issame) == truth["eval_pairs"]["pairs"] == 120 and sum(issame) == 60
    for blob in images[:20]:
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (112, 112, 3)
    overlap = set(truth["eval_overlap_identities"])
    in_pairs = {p for pair in truth["eval_pairs"]["pair_identities"] for p in pair}
    assert overlap <= in_pairs


def test_hostile_pickle_is_refused():
    class Boom:
        def __reduce__(self):
            return (subprocess.call, (["true"],))

    with pytest.raises(UnsafePickleError, match="subprocess"):
        loads_pairs(pickle.dumps(([Boom(), b"x"], [True])))
    with pytest.raises(BinFormatError):
        loads_pairs(b"not a pickle")
    with pytest.raises(BinFormatError, match="2 per pair"):
        loads_pairs(pickle.dumps(([b"a"], [True])))


def _tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_via_cli(tmp_path):
    args = ["--identities", "6", "--images-per-identity", "5", "--format", "all"]
    for name, seed, workers in (("a", "3", "1"), ("b", "3", "2"), ("c", "4", "1")):
        subprocess.run([sys.executable, "-m", "pipelines.cli", "demo-data", "--out", str(tmp_path / name),
                        "--seed", seed, "--workers", workers, *args], check=True, capture_output=True)
    a, b, c = (_tree_digest(tmp_path / n) for n in "abc")
    assert a == b, "same seed must give the same bytes, whatever the worker count"
    assert a.keys() == c.keys() and a != c


def test_identity_sizes_and_confusable_noise_follow_the_config():
    """The knobs of the refinement sweep (benchmarks/bench_refinement.py): identity sizes
    drawn from a range (an alias as large as its original), and label noise drawn only from
    the k identities that look most like the filed one, never from the same person."""
    from cleaning.synthetic.demo import DemoConfig, appearance, make_plan, render_identity

    cfg = DemoConfig(identities=12, images_per_identity=16, images_per_identity_min=8, label_noise=0.5,
                     noise_sources=2, duplicate_identities=1, eval_overlap_identities=0, eval_identities=0)
    plan = make_plan(cfg)
    assert len(plan.sizes) == len(plan.identities) == 13
    assert all(8 <= n <= 16 for n in plan.sizes) and len(set(plan.sizes)) > 1
    [(alias, orig)] = plan.alias_of.items()
    assert plan.sizes[alias] == plan.sizes[orig]
    a = np.stack([appearance(x) for x in plan.identities])
    z = (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1)
    for i, sources in plan.noise_from.items():
        same = {alias, orig} if i in (alias, orig) else {i}
        assert len(sources) == 2 and not same & set(sources)  # never the same person
        others = [j for j in range(len(plan.identities)) if j not in same | set(sources)]
        farthest_source = max(np.linalg.norm(z[i] - z[s]) for s in sources)
        assert all(np.linalg.norm(z[i] - z[j]) >= farthest_source for j in others)  # the look-alikes
    images = render_identity(plan, 0)
    assert len(images) == plan.sizes[0]
    noisy = [im for im in images if "label_noise" in im.defects]
    assert noisy and all(im.true_identity in {plan.alias_of.get(s, s) for s in plan.noise_from[0]} for im in noisy)

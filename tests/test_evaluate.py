"""Evaluation sets and evaluation: insightface .bin files, held-out identities, metrics on known answers."""

import json
import pickle

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaning.formats.insightface_bin import UnsafePickleError
from cleaning.holdout import HELD_OUT, split_holdout
from dataset import RefinedDataset
from pipelines.evaluate import FaceSet, PairSet, identify, load_faces, load_pairs, verify


def _face(colour: int) -> np.ndarray:
    img = np.zeros((112, 112, 3), np.uint8)
    img[:, :, 0] = colour  # red channel encodes "who"
    return img


def _jpeg(img_rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()


class ColourEmbedder:
    """Embeds a face by its red level as an angle: faces of one colour coincide."""

    def __call__(self, faces, flip=True):
        angle = faces[:, 56, 56, 0].astype(np.float64) / 255 * np.pi
        return np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32)


def test_insightface_bin_written_here_is_read(tmp_path):
    # As insightface writes them: pickle.dump((bins, issame_list)) with encoded images.
    bins = [_jpeg(_face(c)) for c in (10, 10, 200, 50)]
    bins[3] = np.frombuffer(bins[3], np.uint8)  # some files hold uint8 arrays instead of bytes
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as fh:
        pickle.dump((bins, [True, False]), fh, protocol=pickle.HIGHEST_PROTOCOL)
    pairs = load_pairs(str(path))
    assert pairs.faces.shape == (4, 112, 112, 3) and pairs.faces.dtype == np.uint8
    assert list(pairs.issame) == [True, False]
    assert abs(int(pairs.faces[2, 56, 56, 0]) - 200) <= 2  # RGB order kept
    assert pairs.name.startswith("lfw-") and len(pairs.name) == len("lfw-") + 8


def test_hostile_bin_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Boom(), b"x"], [True])))
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        load_pairs(str(path))


def test_verification_on_known_answers():
    colours = [0, 0, 60, 60, 120, 120, 180, 180, 240, 240]
    # 10 same pairs (same colour) and 10 different pairs (colours 60 apart).
    faces, issame = [], []
    for i in range(20):
        a = colours[(i * 2) % 10]
        b = a if i % 2 == 0 else (a + 60) % 300
        faces += [_face(a), _face(b)]
        issame.append(i % 2 == 0)
    result = verify(ColourEmbedder(), PairSet("t", "t", np.stack(faces), np.array(issame)))
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["tar_at_far_0.1"] == 1.0
    assert "tar_at_far_0.01" not in result  # 10 negatives cannot measure FAR 1e-2


def test_identification_on_known_answers():
    # Probe identities are chosen by name hash; with well separated colours every trial succeeds.
    names = [f"p{i}" for i in range(8)]
    faces = np.stack([_face(20 + 25 * i) for i in range(8) for _ in range(3)])
    ids = np.array([n for n in names for _ in range(3)])
    out = identify(ColourEmbedder(), FaceSet("f", "f", faces, ids))
    assert out["rank1"] == 1.0 and out["trials"] == 2 * 6 and out["distractors"] == 6 * 3


def test_holdout_moves_identities_into_eval_sets(tmp_path, demo_shards):
    parent = json.loads((demo_shards / "manifest.json").read_text())
    out = tmp_path / "held"
    m = split_holdout(RefinedDataset.open(demo_shards), RefinedDataset.create(out), identities=4, pairs=40,
                      seed=3).manifest.to_dict()
    held = set(m["holdout"]["identities"])
    assert len(held) == 4
    # Every input still accounted for, the held-out ones as rejects with a reason.
    assert m["counts"]["read"] == parent["counts"]["read"] == m["counts"]["kept"] + m["counts"]["rejected"]
    assert m["counts"]["by_stage"]["holdout"]["by_reason"] == {HELD_OUT: parent["num_images"] - m["num_images"]}
    rows = sum(pq.read_metadata(p).num_rows for p in (out / "rejects").glob("*.parquet"))
    assert rows == m["counts"]["rejected"]
    # Training shards: no held identity, labels contiguous, map consistent.
    labels, idents = [], []
    for name in m["shards"]:
        t = pq.read_table(out / "shards" / name, columns=["label", "identity"])
        labels += t.column("label").to_pylist()
        idents += t.column("identity").to_pylist()
    assert not held & set(idents)
    assert sorted(set(labels)) == list(range(m["num_classes"])) == sorted(m["identity_to_label"].values())
    assert all(m["identity_to_label"][i] == l for i, l in zip(idents, labels))
    # Evaluation sets: the pairs and faces come from the held identities only.
    faces = load_faces(str(out / "eval" / "holdout_faces.parquet"))
    assert set(faces.identities.tolist()) == held
    pairs = load_pairs(str(out / "eval" / "holdout_pairs.bin"))
    assert len(pairs.issame) == 40 and pairs.issame.sum() == 20
    pair_uris, face_uris = RefinedDataset.open(out).eval_sets()
    names = [u.rsplit("/", 1)[-1] for u in pair_uris]
    assert names == ["holdout_pairs.bin", "demo_pairs.bin"] and face_uris[0].endswith("holdout_faces.parquet")
    # Same seed, same split and the same pair bytes.
    again = split_holdout(RefinedDataset.open(demo_shards), RefinedDataset.create(tmp_path / "again"), identities=4,
                          pairs=40, seed=3)
    assert again.content_hash == m["content_hash"]
    assert (tmp_path / "again/eval/holdout_pairs.bin").read_bytes() == (out / "eval/holdout_pairs.bin").read_bytes()


def test_cli_bad_input_is_one_clear_error(tmp_path, caplog):
    from pipelines.cli import main

    assert main(["holdout", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--identities", "3"]) == 1
    assert "no manifest.json" in caplog.text
    assert main(["evaluate", "--model", str(tmp_path), "--pairs", str(tmp_path / "lfw.bin")]) == 1
    assert "neither an MLflow model URI nor a training checkpoint folder" in caplog.text


def test_promotion_figure_with_a_dotted_metric_name():
    from pipelines.registry import PromotionRefused, _common_figure

    cand = {"lfw-1a2b3c4d.tar_at_far_0.01": 0.9, "lfw-1a2b3c4d.accuracy": 0.99, "cfp-0f0f0f0f.tar_at_far_0.01": 0.7}
    champ = {"lfw-1a2b3c4d.tar_at_far_0.01": 0.8, "agedb-00000000.tar_at_far_0.01": 0.5}
    assert _common_figure(cand, champ, "tar_at_far_0.01") == (0.9, 0.8, ["lfw-1a2b3c4d"])
    with pytest.raises(PromotionRefused, match="no evaluation set"):
        _common_figure(cand, champ, "rank1")

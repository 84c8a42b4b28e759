"""IJB-B/IJB-C template evaluation: pooling and identification on constructed features with
known answers, the release layout read end to end on the demo's synthetic set, promotion
gated on an IJB figure."""

import json

import numpy as np
import pytest
import torch

from arcface_core.backbones import build_backbone
from arcface_core.metrics import open_set_identification, tar_at_far, template_features, template_pair_scores
from cleaning.synthetic.ijb import write_ijb
from pipelines import ijb
from pipelines.training import checkpoint


def test_media_then_template_pooling():
    feats = np.array([[1, 0], [1, 0], [0, 1], [0, 3], [3, 4]], float)
    templates = np.array([7, 7, 7, 9, 9])
    medias = np.array([1, 1, 2, 3, 4])  # template 7: a two-frame video (media 1) and a still (media 2)
    ids, pooled = template_features(feats, templates, medias)
    assert ids.tolist() == [7, 9]
    np.testing.assert_allclose(pooled[0], [np.sqrt(0.5), np.sqrt(0.5)])  # mean of the video, plus the still
    np.testing.assert_allclose(pooled[1], np.array([3, 7]) / np.hypot(3, 7))
    scores = template_pair_scores(ids, pooled, np.array([[7, 9], [9, 9]]))
    np.testing.assert_allclose(scores, [(3 + 7) * np.sqrt(0.5) / np.hypot(3, 7), 1.0])


def test_open_set_identification_known_answers():
    gallery = np.eye(4)[:3]  # subjects a, b, c
    subjects = np.array(["a", "b", "c"])
    probes = np.array([[1, .2, 0, 0],      # a: rank 1
                       [.5, .4, 0, 0],     # b: rank 2 (a scores higher)
                       [0, 0, 1, 0],       # c: rank 1, exact
                       [.3, .3, 0, 1],     # x: non-mated, best gallery score 0.29
                       [0, .9, 0, .1]])    # y: non-mated, best 0.99
    result = open_set_identification(gallery, subjects, probes, np.array(["a", "b", "c", "x", "y"]),
                                     ranks=(1, 2), fpirs=(0.5, 0.1))
    assert result.mated == 3 and result.non_mated == 2
    assert result.cmc == {1: pytest.approx(2 / 3), 2: 1.0}
    # FPIR 0.5: the threshold lets 1 of 2 non-mated through (just above 0.29); a and c pass it.
    assert result.tpir == {0.5: pytest.approx(2 / 3)}  # FPIR 0.1 < 1/2 cannot be measured: left out
    tie = open_set_identification(np.array([[1, 0], [1, 0]]), np.array(["a", "b"]), np.array([[1, 0]]),
                                  np.array(["a"]), ranks=(1, 2), fpirs=())
    assert tie.cmc == {1: 0.0, 2: 1.0}  # a tie with another subject counts against


def test_far_targets_finer_than_the_impostors_are_left_out():
    scores = np.r_[0.9, 0.8, np.linspace(0.0, 0.5, 10)]
    same = np.r_[True, True, np.zeros(10, bool)]  # 10 impostors: FAR 0.1 is the finest measurable
    assert tar_at_far(scores, same, ijb.FARS) == {0.1: 1.0}
    assert tar_at_far(scores[:5], same[:5], ijb.FARS) == {}  # 3 impostors measure no target at all


@pytest.fixture(scope="module")
def ijb_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb")
    info = write_ijb(root / "IJBC", "IJBC", subjects=12, templates_per_subject=3, seed=2)
    write_ijb(root / "IJBB", "IJBB", subjects=6, templates_per_subject=2, seed=3)
    return root, info


def test_demo_set_in_the_release_layout(ijb_set):
    root, info = ijb_set
    s = ijb.load_ijb(str(root / "IJBC"), "IJBC")
    assert len(s.images) == info["images"] and len(np.unique(s.templates)) == info["templates"] == 36
    assert (s.labels == 1).sum() == info["genuine"] == 36 and len(s.pairs) == info["pairs"]
    assert set(s.galleries) == {"G1", "G2"} and len(s.probes) == 24
    # Templates hold stills and video frames: some media repeat within a template.
    assert len(np.unique(s.medias)) < len(s.images)
    b = ijb.load_ijb(str(root / "IJBB"), "IJBB")
    assert b.target == "IJBB" and len(b.images) > 0
    with pytest.raises(FileNotFoundError, match="not an IJBB release folder"):
        ijb.load_ijb(str(root / "IJBC"), "IJBB")


def _ckpt(folder, seed=0):
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    checkpoint.write_backbone(str(folder), build_backbone("tiny", 32).state_dict(), {}, {})
    checkpoint.write_state(str(folder), {"step": 1, "config": {"backbone": "tiny", "embedding_size": 32}})
    return folder


def test_evaluate_cli_on_ijb(ijb_set, tmp_path, capsys):
    from pipelines.cli import main

    root, _ = ijb_set
    ckpt = _ckpt(tmp_path / "ckpt")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ckpt), "--ijb", str(root / "IJBC"), "--target", "IJBC", "--out", str(out),
                 "--ijb-detector-score"]) == 0
    printed = capsys.readouterr().out
    assert "| 0.1 |" in printed and "insightface" in printed and "rank1" in printed
    results = json.loads((out / "evaluation.json").read_text())
    (name,) = results
    assert name.startswith("IJBC-") and results[name]["pairs"] == 36 * 9
    assert 0.0 <= results[name]["tar_at_far_0.1"] <= 1.0 and "tar_at_far_0.0001" not in results[name]
    assert (out / "roc.png").stat().st_size > 1000


@pytest.mark.services
def test_promotion_gates_on_an_ijb_figure(ijb_set, tmp_path, mlflow_server):
    import mlflow

    from pipelines.models import load_embedder
    from pipelines.registry import log_embedding_model, promote, record_evaluation

    root, _ = ijb_set
    mlflow.set_tracking_uri(mlflow_server)
    s = ijb.load_ijb(str(root / "IJBC"), "IJBC")
    name = f"IJBC-{s.digest}"
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with mlflow.start_run():
            versions.append(log_embedding_model(build_backbone("tiny", 32).eval(), 32, "ijb-gate", {}, {}).version)
    figures = {}
    for v in versions:
        uri = f"models:/ijb-gate/{v}"
        result = ijb.evaluate_ijb(s, ijb.embed_images(s, load_embedder(uri).embedder))
        record_evaluation(uri, {name: result})
        figures[v] = result["tar_at_far_0.1"]
    assert promote("ijb-gate", versions[0], metric="tar_at_far_0.1").promoted  # first champion
    decision = promote("ijb-gate", versions[1], metric="tar_at_far_0.1")
    assert decision.promoted == (figures[versions[1]] > figures[versions[0]])
    assert name in decision.message and "tar_at_far_0.1" in decision.message

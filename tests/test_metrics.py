"""Verification metrics on tiny pair sets whose answers are worked out by hand."""

import numpy as np
import pytest

from arcface_core.metrics import identification_rank1, kfold_accuracy, pair_scores, roc_curve, tar_at_far


def test_pair_scores_by_hand():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[3.0, 4.0], [0.0, 2.0]])
    # normalised: identical (distance 0) and orthogonal (squared distance 2, cosine 0)
    assert pair_scores(a, b, "euclidean").tolist() == pytest.approx([0.0, -2.0])
    assert pair_scores(a, b, "cosine").tolist() == pytest.approx([1.0, 0.0])


def test_roc_and_tar_at_far_by_hand():
    # 4 positives, 10 negatives; scores chosen so the ranking is known.
    pos = [0.9, 0.8, 0.6, 0.3]
    neg = [0.7, 0.5, 0.4, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4]
    scores = np.array(pos + neg)
    issame = np.array([True] * 4 + [False] * 10)
    far, tar, thr = roc_curve(scores, issame)
    # accept >= 0.8: 2 TP, 0 FP; >= 0.7: 2 TP, 1 FP; >= 0.6: 3 TP, 1 FP; >= 0.3: 4 TP, 3 FP
    assert (far[2], tar[2]) == (0.0, 0.5)
    assert (far[3], tar[3]) == (0.1, 0.5)
    assert (far[4], tar[4]) == (0.1, 0.75)
    got = tar_at_far(scores, issame, fars=(0.1, 0.3, 0.01))
    assert got == {0.1: 0.75, 0.3: 1.0}  # 0.01 needs at least 100 negatives: not reported


def test_kfold_accuracy_separable_and_noisy():
    # 20 pairs, 2 folds: positives at distance 0.5, negatives at 1.5 -> perfect with any threshold in (0.5, 1.5]
    dist = np.array([0.5, 1.5] * 10)
    issame = np.array([True, False] * 10)
    res = kfold_accuracy(-dist, issame, nfolds=2)
    assert res.accuracy == 1.0 and res.std == 0.0
    # first best threshold on the grid: the smallest t with 0.5 < t, i.e. 0.51
    assert res.threshold == pytest.approx(0.51)
    # One mislabelled pair in fold 0 (pairs 0-9) costs 1/10 there: mean 0.95, std 0.05.
    issame_noisy = issame.copy()
    issame_noisy[0] = False
    res = kfold_accuracy(-dist, issame_noisy, nfolds=2)
    assert res.fold_accuracies == [0.9, 1.0]
    assert res.accuracy == pytest.approx(0.95) and res.std == pytest.approx(0.05)


def test_kfold_cosine_threshold():
    sims = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.95, 0.05, 0.85, 0.15])
    issame = np.array([True, False] * 5)
    res = kfold_accuracy(sims, issame, nfolds=5, distance="cosine", thresholds=np.array([0.0, 0.5, 0.99]))
    assert res.accuracy == 1.0 and res.threshold == 0.5


def _unit(deg: float) -> list[float]:
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


def test_identification_rank1_by_hand():
    # Identity A: images at 0 and 10 degrees; identity B: 90 and 100; C: a single image
    # (no mate, not a probe). Distractors at 40 and 200 degrees.
    emb = np.array([_unit(0), _unit(10), _unit(90), _unit(100), _unit(300)])
    ids = np.array(["A", "A", "B", "B", "C"])
    distractors = np.array([_unit(40), _unit(200)])
    result = identification_rank1(emb, ids, distractors)
    # 4 trials (A0->A10, A10->A0, B90->B100, B100->B90), mates 10 degrees away, closest
    # distractor 30+ degrees away: all succeed.
    assert (result.rank1, result.probes, result.distractors) == (1.0, 4, 2)
    # A distractor at 5 degrees beats A10 for probe A0 (5 < 10) and A0 for probe A10 (5 < 10),
    # and no B trial: 2 of 4 succeed.
    assert identification_rank1(emb, ids, np.array([_unit(5)])).rank1 == 0.5
    # A distractor exactly as close as the mate is a failure (ties count against).
    tie = identification_rank1(np.array([_unit(0), _unit(10)]), np.array(["A", "A"]), np.array([_unit(-10)]))
    assert tie.rank1 == 0.5  # probe A0: mate at 10, distractor at -10 (tie); probe A10: distractor 20 away
    with pytest.raises(ValueError, match="distractor"):
        identification_rank1(emb, ids, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="two images"):
        identification_rank1(emb[[0, 2]], np.array(["A", "B"]), distractors)

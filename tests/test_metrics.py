"""Verification metrics on tiny pair sets whose answers are worked out by hand."""

import numpy as np
import pytest

from arcface_core.metrics import identification_rank1, insightface_tar_at_far, kfold_accuracy, pair_scores, roc_curve, \
    sklearn_roc_curve, tar_at_far


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


def _eval_ijbc_readout(scores, labels, x_labels):
    """insightface's recognition/arcface_torch/eval_ijbc.py, its lines as written (with
    scikit-learn's roc_curve replaced by `roc` when scikit-learn is not there)."""
    try:
        from sklearn.metrics import roc_curve as roc
    except ImportError:  # pragma: no cover - scikit-learn is optional
        roc = None
    if roc is not None:
        fpr, tpr, _ = roc(labels, scores)
    else:
        fpr, tpr = _literal_sklearn_roc(labels, scores)
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)  # select largest tpr at same fpr
    row = []
    for fpr_iter in np.arange(len(x_labels)):
        _, min_index = min(list(zip(abs(fpr - x_labels[fpr_iter]), range(len(fpr)))))
        row.append(tpr[min_index])
    return row


def _literal_sklearn_roc(y_true, y_score):
    """scikit-learn's _binary_clf_curve + roc_curve(drop_intermediate=True), as its source reads."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    if len(fps) > 2:
        optimal = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[optimal], tps[optimal]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def test_insightface_readout_by_hand():
    # 4 genuine, 10 impostor pairs. Genuine and impostor tie at 0.9, 0.8 and 0.7: three equal
    # (1 TP, 1 FP) steps, whose middle point (FAR 0.2, TAR 0.5) scikit-learn drops.
    pos = [0.9, 0.8, 0.7, 0.2]
    neg = [0.9, 0.8, 0.7] + [0.1] * 7
    scores, issame = np.array(pos + neg), np.array([True] * 4 + [False] * 10)
    fpr, tpr = sklearn_roc_curve(scores, issame)
    assert fpr.tolist() == pytest.approx([0, 0.1, 0.3, 0.3, 1.0]) and tpr.tolist() == [0, 0.25, 0.75, 1.0, 1.0]
    # FAR 0.21: ours is the best TAR with FAR <= 0.21, at FAR 0.2 (our ROC keeps that point): 0.5.
    # insightface's nearest point is FAR 0.3 (0.09 away; 0.1 is 0.11 away), the largest TAR there: 1.0.
    # FAR 0.12: both read FAR 0.1 (TAR 0.25); FAR 0.5: ours 1.0 at FAR 0.3, theirs at FAR 0.3 too.
    assert tar_at_far(scores, issame, (0.21, 0.12, 0.5)) == {0.21: 0.5, 0.12: 0.25, 0.5: 1.0}
    assert insightface_tar_at_far(scores, issame, (0.21, 0.12, 0.5)) == {0.21: 1.0, 0.12: 0.25, 0.5: 1.0}
    # A target finer than 1 / impostors reads the FAR-0 point (here TAR 0), as insightface does.
    assert insightface_tar_at_far(scores, issame, (1e-6,)) == {1e-6: 0.0}


def test_insightface_readout_equals_eval_ijbc_lines():
    rng = np.random.default_rng(5)
    targets = [10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1]
    for trial in range(20):
        n_pos, n_neg = int(rng.integers(5, 300)), int(rng.integers(50, 20000))
        scores = np.r_[rng.normal(0.5, 0.2, n_pos), rng.normal(0.0, 0.2, n_neg)]
        if trial % 2:  # coarse scores: many ties, within and across the classes
            scores = np.round(scores, 2)
        labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
        fpr, tpr = sklearn_roc_curve(scores, labels)
        ref_fpr, ref_tpr = _literal_sklearn_roc(labels, scores)
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)
        ours = insightface_tar_at_far(scores, labels.astype(bool), targets)
        assert list(ours.values()) == [float(v) for v in _eval_ijbc_readout(scores, labels, targets)]
        assert list(ours) == [float(t) for t in targets]


def test_sklearn_roc_curve_equals_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(6)
    scores = np.round(np.r_[rng.normal(1, 1, 200), rng.normal(0, 1, 3000)], 1)
    labels = np.r_[np.ones(200, int), np.zeros(3000, int)]
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores)
    ours_fpr, ours_tpr = sklearn_roc_curve(scores, labels)
    np.testing.assert_array_equal(ours_fpr, fpr)
    np.testing.assert_array_equal(ours_tpr, tpr)

"""Face verification metrics (numpy only): k-fold accuracy, TAR@FAR, ROC.

Conventions. Embeddings are L2-normalised first. `distance="euclidean"` uses the squared
L2 distance between normalised embeddings (range [0, 4], "same" when below the threshold),
as insightface's verification does; `distance="cosine"` uses cosine similarity (range
[-1, 1], "same" when above). Internally both become a *score* where higher means "same".

The k-fold protocol is LFW's as the paper uses it: the pairs are split into k contiguous
folds without shuffling; for each fold the threshold that maximises accuracy on the other
k-1 folds (the first such threshold on the grid) is applied to the held-out fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pair_scores(emb1: np.ndarray, emb2: np.ndarray, distance: str = "euclidean") -> np.ndarray:
    """Score per pair, higher = more alike (negated squared distance for 'euclidean')."""
    a, b = l2_normalize(emb1), l2_normalize(emb2)
    if distance == "cosine":
        return np.sum(a * b, axis=1)
    if distance == "euclidean":
        return -np.sum((a - b) ** 2, axis=1)
    raise ValueError("distance must be 'euclidean' or 'cosine'")


def default_thresholds(distance: str) -> np.ndarray:
    """insightface's grid for squared L2 (0 to 4 step 0.01); a like grid for cosine."""
    if distance == "euclidean":
        return np.arange(0, 4, 0.01)
    return np.arange(-1, 1, 0.005)


@dataclass
class KFoldResult:
    accuracy: float
    std: float
    threshold: float  # mean over folds, in the caller's units (distance or similarity)
    fold_accuracies: list[float]


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray | None = None,
                   distance: str = "euclidean") -> KFoldResult:
    """k-fold accuracy. `scores` as from `pair_scores` (higher = more alike); thresholds in
    distance units for 'euclidean' (same when distance < t) or similarity for 'cosine'
    (same when similarity >= t)."""
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    if len(scores) < nfolds:
        raise ValueError(f"{len(scores)} pairs cannot make {nfolds} folds")
    thresholds = default_thresholds(distance) if thresholds is None else np.asarray(thresholds, np.float64)
    if distance == "euclidean":
        predicted = (-scores)[None, :] < thresholds[:, None]
    else:
        predicted = scores[None, :] >= thresholds[:, None]
    correct = predicted == issame[None, :]  # (T, N): fine at verification-set sizes
    folds = np.array_split(np.arange(len(scores)), nfolds)
    accs, chosen = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(scores)), test)
        best = int(np.argmax(correct[:, train].mean(axis=1)))  # argmax: the first best, as insightface
        chosen.append(thresholds[best])
        accs.append(float(correct[best, test].mean()))
    return KFoldResult(float(np.mean(accs)), float(np.std(accs)), float(np.mean(chosen)), accs)


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false accept rate, true accept rate, threshold): accept when score >= threshold."""
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    # one point per distinct score, taking all ties together
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    far = np.r_[0.0, fp / n_neg]
    tar = np.r_[0.0, tp / n_pos]
    thr = np.r_[np.inf, s[last]]
    return far, tar, thr


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars=(1e-1, 1e-2, 1e-3, 1e-4)) -> dict[float, float]:
    """TAR at the largest threshold set whose FAR does not exceed each target.

    FAR targets finer than 1 / (number of negative pairs) cannot be measured and are left
    out of the result rather than reported as a fake figure.
    """
    far, tar, _ = roc_curve(scores, issame)
    n_neg = int((~np.asarray(issame, bool)).sum())
    out = {}
    for target in fars:
        if n_neg == 0 or target < 1.0 / n_neg:
            continue
        ok = far <= target + 1e-12
        out[float(target)] = float(tar[ok].max())
    return out


@dataclass
class IdentificationResult:
    rank1: float
    probes: int  # (probe, mate) trials
    distractors: int


def identification_rank1(embeddings: np.ndarray, identities: np.ndarray, distractors: np.ndarray,
                         chunk: int = 1024) -> IdentificationResult:
    """1:N rank-1 identification, MegaFace's protocol.

    For every identity with at least two images and every ordered pair (probe p, mate g) of
    its images, the gallery is g plus all distractors (images of other people, none of them
    the probe's identity). The trial succeeds when g is more similar to p than every
    distractor is (ties count as failure). Rank-1 is the share of successful trials.
    """
    emb, dis = l2_normalize(embeddings), l2_normalize(distractors)
    identities = np.asarray(identities)
    if len(dis) == 0:
        raise ValueError("identification needs at least one distractor")
    # Best distractor similarity per probe, in chunks so a 1M-image gallery fits in memory.
    best_distractor = np.full(len(emb), -np.inf)
    for i in range(0, len(dis), chunk):
        best_distractor = np.maximum(best_distractor, (emb @ dis[i:i + chunk].T).max(axis=1))
    hits = trials = 0
    for ident in np.unique(identities):
        idx = np.flatnonzero(identities == ident)
        if len(idx) < 2:
            continue
        sims = emb[idx] @ emb[idx].T  # row: probe, column: mate
        off_diagonal = ~np.eye(len(idx), dtype=bool)
        hits += int(((sims > best_distractor[idx, None]) & off_diagonal).sum())
        trials += len(idx) * (len(idx) - 1)
    if trials == 0:
        raise ValueError("identification needs an identity with at least two images")
    return IdentificationResult(hits / trials, trials, len(dis))


# -- IJB-B / IJB-C template protocol ---------------------------------------------------------

def template_features(image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """IJB pooling (insightface's `image2template_feature`): within a template, the images of
    one media (the frames of a video) are averaged first, then the media features are
    summed; the template feature is L2-normalised. Returns (template ids, features)."""
    feats = np.asarray(image_features, np.float64)
    templates, medias = np.asarray(templates), np.asarray(medias)
    ids = np.unique(templates)
    out = np.zeros((len(ids), feats.shape[1]))
    order = np.argsort(templates, kind="stable")
    bounds = np.searchsorted(templates[order], ids)
    bounds = np.r_[bounds, len(order)]
    for t in range(len(ids)):
        rows = order[bounds[t]:bounds[t + 1]]
        for media in np.unique(medias[rows]):
            out[t] += feats[rows[medias[rows] == media]].mean(axis=0)
    return ids, l2_normalize(out)


def template_pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray,
                         chunk: int = 100_000) -> np.ndarray:
    """Cosine similarity of each (template 1, template 2) pair of the protocol, in chunks
    (IJB-C has 15.7M pairs: all at once would be tens of GB)."""
    order = np.argsort(template_ids)
    sorted_ids = np.asarray(template_ids)[order]
    pairs = np.asarray(pairs)
    at = np.minimum(np.searchsorted(sorted_ids, pairs), max(len(sorted_ids) - 1, 0))
    unknown = np.flatnonzero(~(sorted_ids[at] == pairs).all(axis=1)) if len(sorted_ids) else np.arange(len(pairs))
    if unknown.size:  # never a neighbouring template's score
        raise ValueError(f"pair {unknown[0]} {pairs[unknown[0]].tolist()} names a template without features "
                         f"({unknown.size} such pairs)")
    a, b = order[at[:, 0]], order[at[:, 1]]
    out = np.empty(len(pairs))
    for i in range(0, len(pairs), chunk):
        out[i:i + chunk] = np.einsum("ij,ij->i", template_feats[a[i:i + chunk]], template_feats[b[i:i + chunk]])
    return out


@dataclass
class OpenSetResult:
    cmc: dict[int, float]  # rank -> share of mated probes whose mate is within that rank
    tpir: dict[float, float]  # FPIR -> TPIR (rank-1 and above the threshold that FPIR sets)
    mated: int
    non_mated: int


def open_set_identification(gallery: np.ndarray, gallery_subjects: np.ndarray, probes: np.ndarray,
                            probe_subjects: np.ndarray, ranks=(1, 5, 10), fpirs=(0.01, 0.1)) -> OpenSetResult:
    """1:N identification against one gallery (IJB's G1 or G2). Probes whose subject is in the
    gallery are mated (CMC: the mate within the top k; ties count against), the others are
    non-mated: the score threshold is the one at which a share `fpir` of non-mated probes
    still has a gallery entry at or above it, and TPIR is the share of mated probes found at
    rank 1 with a score at or above that threshold. FPIRs finer than 1 / non-mated probes
    cannot be measured and are left out."""
    g, p = l2_normalize(gallery), l2_normalize(probes)
    gallery_subjects, probe_subjects = np.asarray(gallery_subjects), np.asarray(probe_subjects)
    sims = p @ g.T
    mated = np.isin(probe_subjects, gallery_subjects)
    cmc = {}
    if mated.any():
        m_sims = sims[mated]
        mate = gallery_subjects[None, :] == probe_subjects[mated][:, None]
        mate_score = np.where(mate, m_sims, -np.inf).max(axis=1)
        # rank of the mate: 1 + entries of other subjects scoring at least as high (ties count against)
        rank = 1 + ((m_sims >= mate_score[:, None]) & ~mate).sum(axis=1)
        cmc = {k: float((rank <= k).mean()) for k in ranks}
        top1 = rank == 1
    tpir = {}
    non = sims[~mated].max(axis=1) if (~mated).any() else np.zeros(0)
    for target in fpirs:
        if not mated.any() or len(non) == 0 or target < 1.0 / len(non):
            continue
        # threshold: the smallest score that at most `target` of non-mated probes reach
        k = int(np.floor(target * len(non)))
        ordered = np.sort(non)[::-1]
        threshold = np.nextafter(ordered[k], np.inf) if k < len(ordered) else -np.inf
        tpir[float(target)] = float((top1 & (mate_score >= threshold)).mean())
    return OpenSetResult(cmc, tpir, int(mated.sum()), int((~mated).sum()))


# -- insightface's IJB read-out ----------------------------------------------------------------

def sklearn_roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) as scikit-learn's `roc_curve(labels, scores)` returns them with its default
    `drop_intermediate=True` (what insightface's `eval_ijbc.py` calls), without needing
    scikit-learn: one point per distinct score (ties taken together, scores in decreasing
    order), then every point that lies in the middle of a straight run of equal steps is
    dropped (its second differences of false and true positive counts are both zero), and
    (0, 0) is put first. The dropping matters to a nearest-point read-out: on a run of
    equal (true, false) steps, which a tie between genuine and impostor scores repeated at
    several thresholds makes, the points between the run's ends disappear."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, y = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    if len(fps) > 2:
        kept = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[kept], tps[kept]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1]


def insightface_tar_at_far(scores: np.ndarray, issame: np.ndarray, fars=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
                           ) -> dict[float, float]:
    """TAR as insightface's `eval_ijbc.py` reads it from the ROC: at the point whose FAR is
    *nearest* each target (`min(zip(abs(fpr - target), range(len(fpr))))` over the curve
    flipped so that, among points equally near, the one with the largest TAR wins). Unlike
    `tar_at_far`, that point may lie above the target, so this figure can be higher than
    ours; it is what published IJB tables (arcface_torch's model zoo) report. Every target
    gets a figure, as in insightface (a target finer than 1 / impostors reads the FAR-0
    point); callers that leave unmeasurable targets out do so themselves."""
    fpr, tpr = sklearn_roc_curve(scores, issame)
    fpr, tpr = fpr[::-1], tpr[::-1]
    out = {}
    for target in fars:
        distance = np.abs(fpr - target)
        # min over (distance, index) pairs: the nearest point, the first in the flipped order on ties
        nearest = int(np.flatnonzero(distance == distance.min())[0])
        out[float(target)] = float(tpr[nearest])
    return out

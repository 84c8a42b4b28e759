"""Stage-2 refinement steps: de-noise a dataset with face embeddings.

Stage 1 judges one image at a time; these steps judge images against their identity, and
identities against each other and against the evaluation sets. Each step says what it
drops and why and counts what it did (the datatrove pattern, as in cleaning/steps.py),
but works on the whole embedded dataset at once: a decision about one face needs its
identity's other faces.

    IntraClassOutliers   faces too far (angle) from their identity's centre: label noise
    SmallIdentities      identities left with too few faces to train on
    MergeIdentities      identities whose centres coincide: one person filed twice
    EvaluationOverlap    identities that are people in the evaluation sets

Angles are in degrees between L2-normalised vectors. Centres are robust means: the mean of
the identity's faces, recomputed over the faces within the threshold (so a minority of
mislabelled faces does not drag it), or the model's own class centres when given (sub-centre
ArcFace's rule: the dominant sub-centre, the one most of the identity's faces are nearest to).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class EmbeddedSet:
    """Every face of the dataset being refined, in shard-row order."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    groups: np.ndarray  # (N,) int64: identity group (starts as the stage-1 label; merges join groups)
    identities: np.ndarray  # (N,) str: the source identity
    reasons: np.ndarray = None  # (N,) object: None = kept
    details: np.ndarray = None
    angles: np.ndarray = None  # (N,) float: angle to the identity centre (NaN: not judged)

    def __post_init__(self):
        n = len(self.groups)
        self.reasons = np.full(n, None, object) if self.reasons is None else self.reasons
        self.details = np.full(n, "", object) if self.details is None else self.details
        self.angles = np.full(n, np.nan) if self.angles is None else self.angles

    @property
    def kept(self) -> np.ndarray:
        return np.equal(self.reasons, None)

    def drop(self, rows: np.ndarray, reason: str, details=None) -> None:
        """Drop `rows` with `reason` (a detail string, or one per row); a face already
        dropped keeps its first reason."""
        rows = np.asarray(rows, np.int64)
        fresh = np.equal(self.reasons[rows], None)
        if details is not None and not isinstance(details, str):
            details = np.asarray(details, object)[fresh]
        rows = rows[fresh]
        self.reasons[rows] = reason
        if details is not None:
            self.details[rows] = details


def angle_deg(cos: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def group_centres(emb: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, num_groups: int) -> tuple:
    """(normalised centres (G, D), counts (G,)) over the rows in `mask`."""
    sums = torch.zeros(num_groups, emb.shape[1], dtype=emb.dtype).index_add_(0, groups[mask], emb[mask])
    counts = torch.bincount(groups[mask], minlength=num_groups)
    return normalise(sums), counts


class DenoiseStep:
    name = "step"
    reasons: tuple[str, ...] = ()

    def __init__(self):
        self.dropped: Counter[str] = Counter()
        self.figures: dict = {}

    def apply(self, data: EmbeddedSet) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, data: EmbeddedSet) -> EmbeddedSet:
        before = data.reasons.copy()
        self.apply(data)
        newly = [r for b, r in zip(before, data.reasons) if b is None and r is not None]
        self.dropped.update(newly)
        return data

    def drop(self, data: EmbeddedSet, rows: np.ndarray, reason: str, details=None) -> None:
        assert reason in self.reasons, reason
        data.drop(rows, f"{self.name}/{reason}", details)

    def counts(self) -> dict:
        return {"dropped": dict(self.dropped), **self.figures}


class IntraClassOutliers(DenoiseStep):
    """Drop faces more than `max_angle` from their identity's centre (label noise).

    Identities with fewer than `min_images_to_judge` faces have no trustworthy centre and are
    kept whole (counted as unjudged); with `model_centres` (C, K, D), the centre is the
    identity's dominant sub-centre of the model that embedded the data."""

    name = "intra_class"
    reasons = ("far_from_identity_centre",)

    def __init__(self, max_angle: float, min_images_to_judge: int, iterations: int = 3,
                 model_centres: np.ndarray | None = None):
        super().__init__()
        self.max_angle, self.min_judge, self.iterations = max_angle, min_images_to_judge, iterations
        self.model_centres = model_centres

    def apply(self, data: EmbeddedSet) -> None:
        emb = torch.from_numpy(np.ascontiguousarray(data.embeddings, np.float32))
        groups = torch.from_numpy(data.groups.astype(np.int64))
        live = torch.from_numpy(data.kept)
        num = int(groups.max()) + 1 if len(groups) else 0
        counts = torch.bincount(groups[live], minlength=num)
        judged = live & (counts[groups] >= self.min_judge)
        if self.model_centres is not None:
            centres = self._dominant_subcentres(emb, groups, judged, num)
        else:
            centres, _ = group_centres(emb, groups, judged, num)
            for _ in range(self.iterations):
                cos = (emb * centres[groups]).sum(1)
                inliers = judged & (torch.from_numpy(angle_deg(cos.numpy())) <= self.max_angle)
                refined, n_in = group_centres(emb, groups, inliers, num)
                centres = torch.where((n_in > 0)[:, None], refined, centres)
        angles = angle_deg((emb * centres[groups]).sum(1).numpy())
        data.angles = np.where(judged.numpy(), angles, np.nan)
        out = np.flatnonzero(judged.numpy() & (angles > self.max_angle))
        self.drop(data, out, self.reasons[0], [f"{a:.1f} deg from identity centre" for a in angles[out]])
        self.figures = {"max_angle": self.max_angle, "unjudged_identities": int(((counts > 0) & (counts < self.min_judge)).sum()),
                        "judged_faces": int(judged.sum())}
        self.centres = centres.numpy()

    def _dominant_subcentres(self, emb, groups, judged, num) -> torch.Tensor:
        sub = normalise(torch.from_numpy(np.asarray(self.model_centres, np.float32)))  # (C, K, D)
        if sub.shape[0] < num:
            raise ValueError(f"the model has {sub.shape[0]} class centres for {num} identities: it was not trained "
                             "on this dataset's labels")
        nearest = torch.einsum("nd,nkd->nk", emb, sub[groups]).argmax(1)  # each face's nearest sub-centre
        k = sub.shape[1]
        votes = torch.zeros(num * k, dtype=torch.long).index_add_(
            0, (groups * k + nearest)[judged], torch.ones(int(judged.sum()), dtype=torch.long))
        dominant = votes.view(num, k).argmax(1)
        return sub[torch.arange(num), dominant]


class SmallIdentities(DenoiseStep):
    """Drop identities left with fewer than `min_images` faces: too few to learn a centre."""

    name = "small_identities"
    reasons = ("identity_too_small",)

    def __init__(self, min_images: int):
        super().__init__()
        self.min_images = min_images

    def apply(self, data: EmbeddedSet) -> None:
        kept = data.kept
        counts = np.bincount(data.groups[kept], minlength=int(data.groups.max()) + 1)
        small = kept & (counts[data.groups] < self.min_images)
        self.drop(data, np.flatnonzero(small), self.reasons[0], f"fewer than {self.min_images} faces left")
        self.figures = {"identities_dropped": int(len(np.unique(data.groups[small])))}


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller label names the merged identity


def close_pairs(a: np.ndarray, b: np.ndarray, max_angle: float, chunk: int = 2048, exclude_self: bool = False):
    """Index pairs (i, j) with angle(a[i], b[j]) <= max_angle, in chunks (1M x 100k fits)."""
    min_cos = np.cos(np.radians(max_angle))
    a_t, b_t = torch.from_numpy(np.asarray(a, np.float32)), torch.from_numpy(np.asarray(b, np.float32))
    out_i, out_j = [], []
    for s in range(0, len(a_t), chunk):
        sims = a_t[s:s + chunk] @ b_t.T
        if exclude_self:
            idx = torch.arange(s, min(s + chunk, len(a_t)))
            sims[idx - s, idx] = -2
        i, j = torch.nonzero(sims >= min_cos, as_tuple=True)
        out_i.append(i.numpy() + s)
        out_j.append(j.numpy())
    if not out_i:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(out_i), np.concatenate(out_j)


@dataclass
class Merge:
    into: int
    groups: list[int]
    identities: list[str] = field(default_factory=list)


class MergeIdentities(DenoiseStep):
    """Join identities whose centres are within `max_angle`: the same person filed under two
    ids. Faces are kept; their group becomes the smallest label of the merged set.

    `max_angle` 0 derives it from the data: `relative` times the median angle of the kept
    faces to their own centre (as measured by IntraClassOutliers, which must run first).
    Two ids of one person are trained as different classes, so the bootstrap model pushes
    them apart, the more the longer it trains; relative to the faces' own spread the gap
    stays clear (demo: duplicates at 7-30 deg with medians of 17-21 deg; distinct
    identities 42+ deg apart)."""

    name = "merge_identities"
    reasons = ()

    def __init__(self, max_angle: float = 0.0, relative: float = 2.0):
        super().__init__()
        self.max_angle, self.relative = max_angle, relative
        self.merges: list[Merge] = []

    def apply(self, data: EmbeddedSet) -> None:
        kept = data.kept
        if self.max_angle <= 0:
            inlier = data.angles[kept & np.isfinite(data.angles)]
            if not len(inlier):
                raise ValueError("merge_max_angle 0 derives the threshold from face-to-centre angles: run "
                                 "IntraClassOutliers first (or set an angle)")
            self.max_angle = float(self.relative * np.median(inlier))
        num = int(data.groups.max()) + 1
        emb = torch.from_numpy(np.ascontiguousarray(data.embeddings, np.float32))
        centres, counts = group_centres(emb, torch.from_numpy(data.groups.astype(np.int64)),
                                        torch.from_numpy(kept), num)
        present = np.flatnonzero(counts.numpy() > 0)
        i, j = close_pairs(centres.numpy()[present], centres.numpy()[present], self.max_angle, exclude_self=True)
        uf = _UnionFind(num)
        for a, b in zip(present[i], present[j]):
            uf.union(int(a), int(b))
        root = np.array([uf.find(g) for g in range(num)])
        members: dict[int, list[int]] = {}
        for g in present:
            members.setdefault(int(root[g]), []).append(int(g))
        for into, gs in sorted(members.items()):
            if len(gs) > 1:
                idents = sorted({str(x) for x in data.identities[np.isin(data.groups, gs)]})
                self.merges.append(Merge(into, gs, idents))
        data.groups = root[data.groups]
        self.figures = {"max_angle": self.max_angle, "merged_sets": len(self.merges),
                        "identities_merged_away": sum(len(m.groups) - 1 for m in self.merges)}


class EvaluationOverlap(DenoiseStep):
    """Drop identities that are people in the evaluation sets: those with at least
    `min_faces` evaluation faces within `max_angle` of their centre, and those named in
    `names` (an optional list, e.g. LFW's names where the source ids are names)."""

    name = "evaluation_overlap"
    reasons = ("overlaps_evaluation_set", "named_in_evaluation_list")

    def __init__(self, eval_embeddings: np.ndarray | None, max_angle: float, min_faces: int,
                 names: set[str] | None = None):
        super().__init__()
        self.eval_embeddings, self.max_angle, self.min_faces = eval_embeddings, max_angle, min_faces
        self.names = names or set()

    def apply(self, data: EmbeddedSet) -> None:
        kept = data.kept
        flagged: set[int] = set()
        if self.eval_embeddings is not None and len(self.eval_embeddings):
            num = int(data.groups.max()) + 1
            emb = torch.from_numpy(np.ascontiguousarray(data.embeddings, np.float32))
            centres, counts = group_centres(emb, torch.from_numpy(data.groups.astype(np.int64)),
                                            torch.from_numpy(kept), num)
            present = np.flatnonzero(counts.numpy() > 0)
            i, _ = close_pairs(centres.numpy()[present], self.eval_embeddings, self.max_angle)
            hits = np.bincount(i, minlength=len(present))
            flagged = {int(g) for g in present[hits >= self.min_faces]}
            rows = np.flatnonzero(kept & np.isin(data.groups, list(flagged)))
            self.drop(data, rows, self.reasons[0], f">= {self.min_faces} evaluation faces within {self.max_angle:g} deg")
        named = np.flatnonzero(data.kept & np.isin(data.identities, list(self.names)))
        named_groups = set(np.unique(data.groups[named]).tolist())
        self.drop(data, np.flatnonzero(data.kept & np.isin(data.groups, list(named_groups))), self.reasons[1])
        self.figures = {"max_angle": self.max_angle, "min_faces": self.min_faces,
                        "identities_by_embedding": sorted({str(x) for x in data.identities[np.isin(data.groups, list(flagged))]}),
                        "identities_by_name": sorted({str(x) for x in data.identities[np.isin(data.groups, list(named_groups))]})}


def contiguous_labels(data: EmbeddedSet) -> tuple[np.ndarray, dict[str, int]]:
    """New labels 0..C-1 over the surviving groups (in group order); -1 for dropped faces;
    and the identity -> label map (merged identities share a label)."""
    kept = data.kept
    survivors = np.unique(data.groups[kept])
    new = np.full(int(data.groups.max()) + 1 if len(data.groups) else 0, -1, np.int64)
    new[survivors] = np.arange(len(survivors))
    labels = np.where(kept, new[data.groups], -1).astype(np.int32)
    id_map = {str(i): int(l) for i, l in zip(data.identities[kept], labels[kept])}
    return labels, id_map

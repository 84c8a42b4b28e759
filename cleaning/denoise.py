"""Stage-2 refinement steps: de-noise a dataset with face embeddings.

Stage 1 judges one image at a time; these steps judge images against their identity, and
identities against each other and against the evaluation sets. Each step says what it
drops and why and counts what it did (the datatrove pattern, as in cleaning/steps.py),
but works on the whole embedded dataset: a decision about one face needs its identity's
other faces. Embeddings are read in passes over blocks of rows (`Embeddings`), so a step
holds a block, the C x D centres and a few numbers per face, never the N x D embeddings.

    IntraClassOutliers   faces too far (angle) from their identity's centre: label noise
    SmallIdentities      identities left with too few faces to train on
    MergeIdentities      identities whose centres coincide: one person filed twice
    EvaluationOverlap    identities that are people in the evaluation sets

Thresholds set to 0 are derived from each run's own angles (the figure that set them is in
the step's counts, hence in the manifest and report): the intra-class cut is the valley
between clean and mislabelled faces (Otsu's threshold over face-to-centre angles), the
evaluation-overlap radius the farthest kept face's angle.

Angles are in degrees between L2-normalised vectors. Centres are robust means: the mean of
the identity's faces, recomputed over the faces within the threshold (so a minority of
mislabelled faces does not drag it), or the model's own class centres when given (sub-centre
ArcFace's rule: the dominant sub-centre, the one most of the identity's faces are nearest to).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch


class Embeddings:
    """The faces' embeddings (N, D), L2-normalised, read a block of rows at a time: every
    step makes passes over blocks (the few identities that straddle blocks come back from the
    blocks' own pass), so what a step holds is a block plus C x D centres however large N is. This one holds an array;
    pipelines/embed.ShardEmbeddings reads a refined dataset's embedding shards from storage,
    one shard per block, so no process ever holds the whole N x D."""

    def __init__(self, array: np.ndarray, block_rows: int = 1 << 16):
        self.array = np.ascontiguousarray(array, np.float32)
        self.block_rows = block_rows  # 128 MiB blocks at 512-d

    def __len__(self) -> int:
        return len(self.array)

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows x D) in row order."""
        for s in range(0, len(self.array), self.block_rows):
            yield s, self.array[s:s + self.block_rows]

    def map_blocks(self, fn, *shared) -> Iterator[tuple[int, object]]:
        """(first row, fn(block, first row, *shared)) for each block, in row order: one pass.
        Every pass of the steps is written this way, so that pipelines/embed.ShardEmbeddings
        can run it as parallel Ray tasks, each reading its own shard (`fn` and `shared` must
        then pickle; `shared` is sent once per pass, not per block)."""
        for s, block in self.blocks():
            yield s, fn(block, s, *shared)


@dataclass
class EmbeddedSet:
    """Every face of the dataset being refined, in shard-row order."""

    embeddings: Embeddings  # or an (N, D) array, wrapped
    groups: np.ndarray  # (N,) int64: identity group (starts as the stage-1 label; merges join groups)
    identities: np.ndarray  # (N,) str: the source identity
    reasons: np.ndarray = None  # (N,) object: None = kept
    details: np.ndarray = None
    angles: np.ndarray = None  # (N,) float: angle to the identity centre (NaN: not judged)
    same_person_angle: float | None = None  # derived by IntraClassOutliers (merge_same_person_angle 0)

    def __post_init__(self):
        if isinstance(self.embeddings, np.ndarray):
            self.embeddings = Embeddings(self.embeddings)
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


def group_sums(emb: Embeddings, groups, mask, num_groups: int) -> tuple:
    """(sums (G, D), counts (G,)) of the rows in `mask` per group, one pass."""
    groups, mask = _as_numpy(groups).astype(np.int64, copy=False), _as_numpy(mask).astype(bool, copy=False)
    sums = torch.zeros(num_groups, emb.dim, dtype=torch.float32)
    for _, (ids, block_sums) in emb.map_blocks(_block_sums, groups, mask):
        sums.index_add_(0, torch.from_numpy(np.array(ids)), block_sums)  # results of Ray tasks are read-only
    return sums, torch.from_numpy(np.bincount(groups[mask], minlength=num_groups))


def group_centres(emb: Embeddings, groups, mask, num_groups: int) -> tuple:
    """(normalised centres (G, D), counts (G,)) over the rows in `mask`, one pass."""
    sums, counts = group_sums(emb, groups, mask, num_groups)
    return normalise(sums), counts


def _as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _block_sums(block: np.ndarray, start: int, groups: np.ndarray, mask: np.ndarray) -> tuple:
    """The groups present in a block's masked rows, and the sum of their rows."""
    rows = slice(start, start + len(block))
    m = mask[rows]
    ids, inverse = np.unique(groups[rows][m], return_inverse=True)
    sums = torch.zeros(len(ids), block.shape[1], dtype=torch.float32)
    sums.index_add_(0, torch.from_numpy(inverse.reshape(-1).astype(np.int64)), torch.from_numpy(block[m]))
    return ids.astype(np.int64), sums


def densest_centres(emb: Embeddings, groups: np.ndarray, mask: np.ndarray, num_groups: int,
                    share: float = 0.4) -> torch.Tensor:
    """Per group, the centre of its densest part: the face whose nearest `share` of the
    group's faces are the most similar to it, and the normalised mean of those. The plain
    mean is a poor start when half the faces are someone else's: with the noise from a few
    look-alikes (demo, 50% label noise from 3 look-alikes per identity) clean faces lay 25.5
    deg (median) from the mean and mislabelled ones 48; from the densest quarter's centre,
    11.5 and 62. Holds while the identity's own person is the largest part and at least
    `share` of its faces. Group by group, block by block (map_groups)."""
    centres = torch.zeros(num_groups, emb.dim, dtype=torch.float32)
    for g, centre in map_groups(emb, groups, mask, _densest_centre_of, share).items():
        centres[g] = torch.from_numpy(np.array(centre))  # results of Ray tasks are read-only
    return centres


def _densest_centre(faces: torch.Tensor, share: float) -> torch.Tensor:
    k = max(1, int(np.ceil(share * len(faces))))
    near = (faces @ faces.T).topk(k, dim=1)
    best = int(near.values.mean(1).argmax())
    return normalise(faces[near.indices[best]].mean(0, keepdim=True))[0]


def _densest_centre_of(faces: np.ndarray, share: float) -> np.ndarray:
    return _densest_centre(torch.from_numpy(np.ascontiguousarray(faces)), share).numpy()


def angles_to_centres(emb: Embeddings, centres: torch.Tensor, groups) -> np.ndarray:
    """Each row's angle (degrees) to its group's centre, one block at a time."""
    groups = _as_numpy(groups).astype(np.int64, copy=False)
    cos = np.empty(len(emb), dtype=np.float32)
    for s, block_cos in emb.map_blocks(_block_cos, _as_numpy(centres), groups):
        cos[s:s + len(block_cos)] = block_cos
    return angle_deg(cos)


def _block_cos(block: np.ndarray, start: int, centres: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return (torch.from_numpy(block) * torch.from_numpy(centres[groups[start:start + len(block)]])).sum(1).numpy()


def valley_threshold(angles: np.ndarray, separation: float = 0.75) -> tuple[float, dict]:
    """The angle that splits face-to-centre angles into the clean mode and the mislabelled
    one. Two modes (Otsu's split explains more than `separation` of the variance; one
    Gaussian mode gives 0.64, a flat spread 0.75, the demo's 10-50% noise 0.80-0.93):
    Otsu's threshold, never below the clean side's median + 4 robust sigmas (1.4826 x MAD).
    One mode (little or no noise, where Otsu would cut the clean faces in half): the whole
    distribution's median + 4 robust sigmas. Returns (degrees, the figures that set it)."""
    from skimage.filters import threshold_otsu

    angles = np.asarray(angles, np.float64)
    angles = angles[np.isfinite(angles)]
    if len(angles) < 2 or np.ptp(angles) == 0:
        return 180.0, {"rule": "no spread to split: nothing dropped"}

    def tail(x: np.ndarray) -> float:
        median = float(np.median(x))
        return min(180.0, median + 4 * 1.4826 * float(np.median(np.abs(x - median))))

    otsu = float(threshold_otsu(angles, nbins=360))
    low, high = angles[angles <= otsu], angles[angles > otsu]
    explained = len(low) * len(high) / len(angles) ** 2 * (high.mean() - low.mean()) ** 2 / angles.var() \
        if len(high) else 0.0
    figures = {"otsu_deg": round(otsu, 2), "variance_explained_by_split": round(float(explained), 3)}
    if explained <= separation:
        return tail(angles), {"rule": "one mode: median + 4 robust sigmas", **figures}
    floor = tail(low)
    return max(otsu, floor), {"rule": "otsu, floored at the clean mode's median + 4 robust sigmas",
                              "clean_mode_floor_deg": round(floor, 2), **figures}


def round_decision(angles: np.ndarray, threshold: float, derived: dict, another_round_above: float) -> dict:
    """Whether a model's judgement is evidence enough to stop refining (no further round), and
    where an intermediate round cuts; from the judged faces' angles to their centres, the
    threshold the intra-class step set and the figures that set it (`valley_threshold`'s).

    A derived threshold is Otsu's valley only when the split saw two modes and the clean
    mode's floor did not raise it. Otherwise it came from a fallback - the floor (Otsu's
    low side is wide: mislabelled faces inside it) or the one-mode rule (no valley seen) -
    and the few faces beyond it say the model could not separate the noise, not that there
    is little: on the seed sweep's weak round-1 models those cuts lay at 61-141 deg where
    Otsu's was 39-60, found 0-15% of the faces at 45-50% noise, and stopped after one round
    (recall 0.00-0.40; benchmarks/results/refinement_seed_sweep_before.md). So then the share
    that decides is the share beyond Otsu's split. An intermediate round's output only
    trains the next model, and every stage-1 face is judged again by it: a clean face it
    drops comes back, a mislabelled face it keeps teaches the next model the wrong person.
    So it cuts at Otsu's split when that is lower than the threshold."""
    angles = np.asarray(angles, np.float64)
    angles = angles[np.isfinite(angles)]
    judged = max(1, len(angles))
    found = float((angles > threshold).sum() / judged)
    otsu = derived.get("otsu_deg")
    decision = {"threshold_deg": round(float(threshold), 2), "threshold_rule": derived.get("rule", "configured"),
                "share_found": round(found, 4), "another_round_above": another_round_above}
    if otsu is None:  # a configured angle, or nothing to split: its own share decides
        share, cut = found, float(threshold)
        decision["decided_by"] = "the share beyond the threshold"
    else:
        beyond = float((angles > otsu).sum() / judged)
        valley = derived["rule"].startswith("otsu") and threshold <= otsu
        share = found if valley else beyond
        cut = min(float(threshold), float(otsu))
        decision.update({"otsu_deg": round(float(otsu), 2), "share_beyond_otsu": round(beyond, 4),
                         "decided_by": "the share beyond the threshold (Otsu's valley)" if valley else
                         "the share beyond Otsu's split (the threshold came from a fallback rule)"})
    decision.update({"deciding_share": round(share, 4), "another_round": share >= another_round_above,
                     "intermediate_cut_deg": round(cut, 2)})
    return decision


class DenoiseStep:
    name = "step"
    reasons: tuple[str, ...] = ()

    def __init__(self):
        self.dropped: Counter[str] = Counter()
        self.figures: dict = {}

    def apply(self, data: EmbeddedSet) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, data: EmbeddedSet) -> EmbeddedSet:
        before = data.kept
        self.apply(data)
        self.dropped.update(data.reasons[before & ~data.kept].tolist())
        return data

    def drop(self, data: EmbeddedSet, rows: np.ndarray, reason: str, details=None) -> None:
        assert reason in self.reasons, reason
        data.drop(rows, f"{self.name}/{reason}", details)

    def counts(self) -> dict:
        return {"dropped": dict(self.dropped), **self.figures}


# The fewest faces that say anything about an identity: fewer, and neither its merge evidence
# (MergeIdentities) nor a centre on faces nobody else claims (_person_centres) is weighed.
FEWEST_FACES_TO_WEIGH = 3


class IntraClassOutliers(DenoiseStep):
    """Drop faces more than `max_angle` from their identity's centre (label noise); with
    `max_angle` 0, more than the run's valley_threshold (recomputed as the centres settle).

    Identities with fewer than `min_images_to_judge` faces have no trustworthy centre and are
    kept whole (counted as unjudged); with `model_centres` (C, K, D), the centre is the
    identity's dominant sub-centre of the model that embedded the data."""

    name = "intra_class"
    reasons = ("far_from_identity_centre",)

    def __init__(self, max_angle: float, min_images_to_judge: int, iterations: int = 3,
                 model_centres: np.ndarray | None = None, densest_share: float = 0.4,
                 nearer_another: bool = False, same_person_angle: float = 10.0):
        super().__init__()
        self.max_angle, self.min_judge, self.iterations = max_angle, min_images_to_judge, iterations
        self.model_centres, self.densest_share = model_centres, densest_share
        self.nearer_another, self.same_person_angle = nearer_another, same_person_angle

    def apply(self, data: EmbeddedSet) -> None:
        emb = data.embeddings
        groups = torch.from_numpy(data.groups.astype(np.int64))
        live = torch.from_numpy(data.kept)
        num = int(groups.max()) + 1 if len(groups) else 0
        counts = torch.bincount(groups[live], minlength=num)
        judged = live & (counts[groups] >= self.min_judge)
        judged_np = judged.numpy()
        self.threshold, derived = self.max_angle, {"rule": "configured"}

        def settle(angles: np.ndarray) -> None:
            nonlocal derived
            if self.max_angle <= 0:
                self.threshold, derived = valley_threshold(angles[judged_np])

        def refine(centres: torch.Tensor) -> torch.Tensor:
            for _ in range(self.iterations):
                angles = angles_to_centres(emb, centres, groups)
                settle(angles)
                inliers = judged & torch.from_numpy(angles <= self.threshold)
                refined, n_in = group_centres(emb, groups, inliers, num)
                centres = torch.where((n_in > 0)[:, None], refined, centres)
            return centres

        persons, two_people = None, set()
        if self.model_centres is not None:
            centres = self._dominant_subcentres(emb, groups, judged, num)
        else:
            centres = refine(densest_centres(emb, data.groups, judged_np, num, self.densest_share))
        self.same_person_from = {"rule": "configured"}
        if self.same_person_angle <= 0:  # derived from this model's spread of identities
            angles = angles_to_centres(emb, centres, groups)
            if self.model_centres is not None:  # no threshold settled on these centres yet
                settle(angles)
            self.same_person_angle, self.same_person_from = derived_same_person_angle(
                emb, data.groups, judged_np & (angles <= self.threshold), num)
        data.same_person_angle = self.same_person_angle
        if self.model_centres is None and self.nearer_another:
            # Not refined again: within the threshold a look-alike's faces would pull the
            # centre back between the two people.
            centres, persons, two_people = self._person_centres(data, judged_np, centres, num)
        angles = angles_to_centres(emb, centres, groups)
        settle(angles)
        data.angles = np.where(judged_np, angles, np.nan)
        out = np.flatnonzero(judged_np & (angles > self.threshold))
        self.drop(data, out, self.reasons[0], [f"{a:.1f} deg from identity centre" for a in angles[out]])
        self.figures = {"max_angle": round(float(self.threshold), 2), "max_angle_from": derived,
                        "same_person_angle": round(float(self.same_person_angle), 2),
                        "same_person_angle_from": self.same_person_from,
                        "unjudged_identities": int(((counts > 0) & (counts < self.min_judge)).sum()),
                        "judged_faces": int(judged.sum())}
        if persons is not None:
            self.figures["persons"] = persons
        if self.nearer_another:
            self.figures["nearer_another_identity"] = self._nearer_another_identity(data, judged_np, num, two_people)
        self.centres = centres.numpy()

    def _nearer_another_identity(self, data: EmbeddedSet, judged: np.ndarray, num: int,
                                 two_people: set = frozenset()) -> dict:
        """Drop the judged faces that lie nearer another judged identity's centre than their
        own (centres: the means of the kept faces, recomputed after each pass). Look-alike
        noise sits inside the clean mode's angles, where no threshold can tell it: on the
        seed sweep's 45% confusable case (seed 10) a threshold alone found 0.70 of the noise
        after two rounds; with this rule the round-1 model's judgement found 0.96 (precision
        0.97). Not against an identity whose underlying centre lies within
        `same_person_angle` (true_centre_cos): one person filed twice, which MergeIdentities
        joins; its faces intermix and are not noise. Unless the two are `two_people`: given
        different persons by _person_centres, one holding faces of the other's. Two look-
        alikes whose folders hold each other's faces keep a mixture each, whose centres then
        coincide, and merge (seed sweep, 45% look-alike noise: 1 of the 5 200x30 seeds, 2
        of the 10 50x20 seeds); the persons tell them apart."""
        emb, groups = data.embeddings, data.groups.astype(np.int64)
        first = np.zeros(num, np.int64)  # a row of each group, for its name
        first[groups[::-1]] = np.arange(len(groups))[::-1]
        found, passes, candidates = 0, 0, None
        for passes in range(1, self.iterations + 1):
            live = data.kept & judged
            sums, counts = group_sums(emb, groups, live, num)
            present = np.flatnonzero(counts.numpy() > 0)
            if len(present) < 2:
                break
            centres = normalise(sums).numpy()
            if candidates is None:  # the neighbourhood of the first pass's centres (they move little)
                candidates = _nearest_centres(centres[present], present, num, NEAREST_IDENTITIES)
            rows, nearest_group = [], []
            for _, (r, g) in emb.map_blocks(_block_nearest_identity, centres, candidates, groups, live):
                rows.append(r)
                nearest_group.append(g)
            rows, other = np.concatenate(rows), np.concatenate(nearest_group)
            own = groups[rows]
            pairs = {(int(a), int(b)) for a, b in zip(own, other)}
            sums_np = sums.double()
            same = {(a, b) for a, b in pairs if frozenset((a, b)) not in two_people
                    and angle_deg(np.float64(true_centre_cos_from_sums(sums_np[a], int(counts[a]), sums_np[b],
                                                                      int(counts[b])))) <= self.same_person_angle}
            noise = np.array([(int(a), int(b)) not in same for a, b in zip(own, other)], bool)
            if not noise.any():
                break
            rows, other = rows[noise], other[noise]
            self.drop(data, rows, self.reasons[0],
                      [f"nearer identity {data.identities[first[g]]}'s centre than its own" for g in other])
            found += len(rows)
        return {"dropped": found, "passes": passes, "same_person_angle": round(self.same_person_angle, 2),
                "pairs_of_two_people": len(two_people)}

    def _person_centres(self, data: EmbeddedSet, judged: np.ndarray, centres: torch.Tensor,
                        num: int) -> tuple[torch.Tensor, dict, set]:
        """Each identity's centre on its own person, decided across identities: a folder's
        densest part is not always its person. With look-alike label noise its own person
        can be outnumbered by one look-alike (45% noise from 3 look-alikes: 4-9 own faces
        against as many of one look-alike), or lie within the threshold of one (faces 37-54
        deg apart, thresholds 41-47) so that the centre settles between the two; its own
        faces are then dropped and the merge step joins it to the look-alike's identity
        (seed sweep, 45% confusable noise: 2-4 such identities per seed, precision 0.91-0.95,
        benchmarks/results/refinement_seed_sweep_previous.md; with this step 0.97-0.996,
        refinement_seed_sweep.md).

        1. Each identity's judged faces in clusters (_subclusters: average linkage cut at 2.5
           times the inliers' median angle to their centre - one person's faces lie about
           1.4 times that apart - then each face to its nearest cluster within the threshold).
        2. Clusters of all identities joined into persons where their underlying centres lie
           within `same_person_angle` (_link_same_person).
        3. Persons given to identities, one identity each, so as to keep the most faces
           (_give_persons): a look-alike goes to the identity with more of it, and the folder
           it outnumbered takes its own person. An identity left without one is either a
           folder whose own person no identity was given (too few faces to give: 4 own faces
           against 5 of a look-alike) or one person filed twice (its person went to the
           identity with more of it). It takes the faces nobody else claims when they are
           at least half as many as its largest person's (and FEWEST_FACES_TO_WEIGH), else
           that largest person (merged later): an alias's unclaimed faces are a look-alike's
           few, against its person's 9-12 (seed sweep, 45% confusable noise, seed 12: 3
           against 9), and an outnumbered folder's own person nearly matches the look-alike
           (seeds 3, 4: 4 against 5: 2 of the sweep's 7 false merges came from taking the
           look-alike, and 4 of 18 in 28 cases of other sweeps, 50% noise among them).
           Where two or more such persons are others' and hold at least half the faces of its
           largest, it goes with the one whose identity's folder draws its mislabelled faces
           from the same identities (_person_by_noise_sources);
           failing that, where two tie for its largest, with the one whose identity's folder
           holds more faces of the same other persons (_tied_person_by_shared_noise).
        Its centre is the mean of those faces; an identity with no cluster that large keeps
        the centre it had. The counts, and the identities moved off their largest person,
        are in the manifest. Also returned: the pairs of identities given different persons
        where one holds faces of the other's (two people, for _nearer_another_identity)."""
        emb, groups = data.embeddings, data.groups.astype(np.int64)
        angles = angles_to_centres(emb, centres, groups)
        inliers = judged & (angles <= self.threshold)
        if not inliers.any():
            return centres, {"identities_moved": 0}, set()
        cut = 2.5 * float(np.median(angles[inliers]))
        found = map_groups(emb, groups, judged, _subclusters, cut, self.threshold)
        clusters = [(g, total, n) for g, parts in found.items() for total, n in parts]
        if not clusters:
            return centres, {"cluster_cut_deg": round(cut, 2), "identities_moved": 0}, set()
        owner = np.array([g for g, _, _ in clusters])
        sums = torch.from_numpy(np.stack([total for _, total, _ in clusters]))
        sizes = np.array([n for _, _, n in clusters])
        person = _link_same_person(sums, sizes, self.same_person_angle)
        rows_of = defaultdict(list)  # (identity, person) -> its clusters
        for i, (g, p) in enumerate(zip(owner.tolist(), person.tolist())):
            rows_of[g, p].append(i)
        faces_of = {key: int(sizes[rows].sum()) for key, rows in rows_of.items()}
        given = _give_persons(faces_of, self.min_judge)
        given_to = {p: g for g, p in given.items()}
        two_people = {frozenset((g, given_to[p])) for g, p in faces_of
                      if g in given and p in given_to and given_to[p] != g}
        largest = {}
        for (g, p), n in sorted(faces_of.items(), key=lambda item: (-item[1], item[0])):
            largest.setdefault(g, (p, n))
        persons_in = defaultdict(dict)  # identity -> {person: its faces there}
        for (g, p), n in faces_of.items():
            persons_in[g][p] = n
        taken = set(given.values())
        unclaimed = defaultdict(list)
        for (g, p), rows in rows_of.items():
            if g not in given and p not in taken:
                unclaimed[g] += rows
        chosen = {g: rows_of[g, p] for g, p in given.items()}
        ties_broken, by_noise_sources = 0, 0
        # Identities that will be left choosing between persons others were given, and those
        # others: where their folders' mislabelled faces come from (one pass, these rows only).
        candidates_of = {g: found for g, (p, n) in largest.items() if g not in chosen and n >= self.min_judge
                         and (found := _claimed_candidates(persons_in[g], g, given_to, self.min_judge))}
        folders = set(candidates_of) | {given_to[p] for found in candidates_of.values() for p in found}
        sources = _noise_sources(emb, groups, judged, centres, folders) if folders else {}
        for g, (p, n) in largest.items():
            if g not in chosen:
                own = sizes[unclaimed[g]].sum()
                if own >= FEWEST_FACES_TO_WEIGH and 2 * own >= n:
                    chosen[g] = unclaimed[g]
                elif n >= self.min_judge:
                    tied_best = _person_by_noise_sources(sources, persons_in[g], g, candidates_of.get(g, []), given_to)
                    if tied_best is None:
                        tied_best = _tied_person_by_shared_noise(persons_in, g, p, given_to)
                        ties_broken += tied_best != p
                    else:
                        by_noise_sources += tied_best != p
                    largest[g] = (tied_best, n)
                    chosen[g] = rows_of[g, tied_best]
        centres, moved = centres.clone(), []
        for g, rows in chosen.items():
            centres[g] = normalise(sums[rows].sum(0))
            if rows != rows_of[g, largest[g][0]]:
                moved.append(g)
        return centres, {"cluster_cut_deg": round(cut, 2), "clusters": len(clusters),
                         "persons": int(len(np.unique(person))), "identities_given_a_person": len(given),
                         "identities_moved": len(moved), "ties_broken_by_shared_noise": ties_broken,
                         "taken_by_noise_sources": by_noise_sources,
                         "moved_off_their_largest_person": [str(data.identities[np.flatnonzero(groups == g)[0]])
                                                            for g in moved[:20]]}, two_people

    def _dominant_subcentres(self, emb, groups, judged, num) -> torch.Tensor:
        sub = normalise(torch.from_numpy(np.asarray(self.model_centres, np.float32)))  # (C, K, D)
        if sub.shape[0] < num:
            raise ValueError(f"the model has {sub.shape[0]} class centres for {num} identities: it was not trained "
                             "on this dataset's labels")
        closest = torch.empty(len(emb), dtype=torch.long)  # each face's nearest sub-centre
        for s, nearest_sub in emb.map_blocks(_block_nearest_subcentre, sub.numpy(), groups.numpy()):
            closest[s:s + len(nearest_sub)] = torch.from_numpy(np.array(nearest_sub))
        k = sub.shape[1]
        votes = torch.zeros(num * k, dtype=torch.long).index_add_(
            0, (groups * k + closest)[judged], torch.ones(int(judged.sum()), dtype=torch.long))
        dominant = votes.view(num, k).argmax(1)
        return sub[torch.arange(num), dominant]


# A face is weighed against the centres of its identity's nearest identities only: a look-
# alike's centre lies near its own identity's (what nearer_another_identity is for; noise from
# anyone else lies beyond the threshold), and against all 85K identities of MS1MV2 each pass
# would cost 5.8M x 85K dot products of 512 dimensions.
NEAREST_IDENTITIES = 32


def _nearest_centres(centres: np.ndarray, present: np.ndarray, num: int, k: int) -> np.ndarray:
    """(num, k) group ids: each present group's `k` nearest other groups by centre (-1: none,
    or padding where fewer groups are present); `centres` are the present groups'."""
    out = np.full((num, k), -1, np.int64)
    k_here = min(k, len(present) - 1)
    c = torch.from_numpy(np.asarray(centres, np.float32))
    chunk = max(1, (1 << 25) // max(1, len(c)))
    for s in range(0, len(c), chunk):
        sims = c[s:s + chunk] @ c.T
        sims[torch.arange(len(sims)), torch.arange(s, s + len(sims))] = -2.0  # not itself
        out[present[s:s + chunk], :k_here] = present[sims.topk(k_here, dim=1).indices.numpy()]
    return out


def _block_nearest_identity(block: np.ndarray, start: int, centres: np.ndarray, candidates: np.ndarray,
                            groups: np.ndarray, live: np.ndarray, chunk: int = 4096) -> tuple:
    """This block's live faces nearer another identity's centre (of their identity's nearest,
    `candidates`) than their own: (rows, that group). `centres`: all groups' (num, D)."""
    rows = start + np.flatnonzero(live[start:start + len(block)])
    out_rows, out_groups = [], []
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        faces = torch.from_numpy(block[r - start])
        own = (faces * torch.from_numpy(centres[groups[r]])).sum(1)
        cand = candidates[groups[r]]
        # Against the chunk's candidates at once (its rows hold a few identities), then each
        # face's own k read out of that: no (chunk, k, D) copy of the centres.
        union = np.unique(cand[cand >= 0])
        if len(union) * len(r) <= 1 << 25:
            all_sims = faces @ torch.from_numpy(centres[union]).T
            column = torch.from_numpy(np.searchsorted(union, np.maximum(cand, 0)).clip(0, max(0, len(union) - 1)))
            sims = all_sims.gather(1, column) if len(union) else torch.full(cand.shape, -2.0)
        else:  # rows of many identities (shards not in label order): each face's own k, 512 at a time
            sims = torch.cat([torch.einsum("nd,nkd->nk", faces[i:i + 512],
                                           torch.from_numpy(centres[np.maximum(cand[i:i + 512], 0)]))
                              for i in range(0, len(r), 512)])
        sims[torch.from_numpy(cand < 0)] = -2.0
        best = sims.max(1)
        away = (best.values > own).numpy()
        out_rows.append(r[away])
        out_groups.append(cand[np.arange(len(r)), best.indices.numpy()][away])
    if not out_rows:
        return rows, rows
    return np.concatenate(out_rows), np.concatenate(out_groups)


def map_groups(emb: Embeddings, groups: np.ndarray, mask: np.ndarray, fn, *args) -> dict:
    """fn(faces of a group, *args) for each group with rows in `mask`: groups whose rows lie in
    one block are done there (in parallel under Ray), those straddling blocks from their
    parts, gathered by the driver (a few). `fn` must be a module-level function."""
    rows_of = _rows_by_group(groups, mask)
    num = int(groups.max()) + 1 if len(groups) else 0
    first, last = np.full(num, -1, np.int64), np.full(num, -1, np.int64)
    ids = np.fromiter(rows_of, np.int64, len(rows_of))
    first[ids] = [m.min() for m in rows_of.values()]
    last[ids] = [m.max() for m in rows_of.values()]
    results, straddling = {}, {}
    for _, (inside, parts) in emb.map_blocks(_block_map_groups, groups, mask, first, last, fn, *args):
        results.update(inside)
        for g, faces in parts.items():
            straddling.setdefault(g, []).append(faces)
    for g, faces in straddling.items():
        results[g] = fn(np.concatenate(faces), *args)
    return results


def _block_map_groups(block: np.ndarray, start: int, groups: np.ndarray, mask: np.ndarray, first: np.ndarray,
                      last: np.ndarray, fn, *args) -> tuple:
    end = start + len(block)
    rows = start + np.flatnonzero(mask[start:end])
    present = np.unique(groups[rows])
    whole = (first[present] >= start) & (last[present] < end)
    members = _rows_by_group(groups[rows], np.ones(len(rows), bool))
    inside = {int(g): fn(block[rows[members[g]] - start], *args) for g in present[whole].tolist()}
    parts = {int(g): block[rows[members[g]] - start] for g in present[~whole].tolist()}
    return inside, parts


def _subclusters(faces: np.ndarray, cut_deg: float, reach_deg: float) -> list[tuple[np.ndarray, int]]:
    """A group's faces in clusters: tight cores (average linkage on the angle, cut at
    `cut_deg`; two faces at least), then every face joins the core whose centre is nearest,
    within `reach_deg` (a person the model embeds loosely has a core and scattered faces
    around it). Each cluster of two faces or more: the sum of its faces and its size."""
    from scipy.cluster.hierarchy import fcluster, linkage

    x = np.asarray(faces, np.float64)
    if len(x) < 2:
        return []
    label = fcluster(linkage(x, method="average", metric="cosine"), 1 - np.cos(np.radians(cut_deg)), "distance")
    ids, size = np.unique(label, return_counts=True)
    cores = ids[size >= 2]
    if not len(cores):
        return []
    centres = np.stack([x[label == k].sum(0) for k in cores])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sims = x @ centres.T
    nearest_core = sims.argmax(1)
    reached = sims.max(1) >= np.cos(np.radians(reach_deg))
    joined = [reached & (nearest_core == c) for c in range(len(cores))]
    return [(x[m].sum(0).astype(np.float32), int(m.sum())) for m in joined if m.sum() >= 2]


def _tied_person_by_shared_noise(persons_in: dict, g: int, largest: int, given_to: dict) -> int:
    """Identity g, left without a person of its own, goes with its largest person, which is
    another identity's. Where two persons tie for largest (one look-alike's faces as many as
    its own person's, whose faces went to an alias of g: the 45% look-alike noise seed sweep
    holds 45 such folders in 30 cases), counting cannot choose, and the lower label won
    before: a false merge with the look-alike's identity and a missed one with the alias.
    One person's folders draw their mislabelled faces from the same people (those who look
    like, or are confused with, that person), a look-alike's folder from the look-alike's own:
    so g takes the tied person whose identity's folder holds more faces of g's other persons
    (the tied persons left out of the count, since look-alikes hold each other's faces).
    Replayed on the sweep's kept cases, last round (benchmarks/replay_denoise.py): 60 cases at
    30-45% noise, failing the bar 11 -> 8 (false merges 4 -> 1, missed 9 -> 7); the 45%
    look-alike sweep of the final rules 4 -> 2; no other case changed (50%, 200 x 30, 16
    more). Near ties (one face apart) gained nothing and cost a case at 50% noise."""
    mine = persons_in[g]
    tied = [p for p, n in mine.items() if n == mine[largest] and p in given_to]
    if len(tied) < 2:
        return largest

    shared = {p: _shared_count(mine, persons_in[given_to[p]], tied) for p in tied}
    return max(tied, key=lambda p: (shared[p], -p))  # as many shared: the lower label, as before


def _shared_count(mine: dict, theirs: dict, left_out) -> int:
    """How many of `mine` (key -> count) `theirs` holds too, keys in `left_out` not counted:
    the size of the two multisets' intersection."""
    return sum(min(n, theirs.get(q, 0)) for q, n in mine.items() if q not in left_out)


def _claimed_candidates(mine: dict, g: int, given_to: dict, min_faces: int) -> list[int]:
    """The persons of identity g (`mine`: person -> its faces there, `min_faces` or more) that
    other identities were given: what g, left without a person of its own, may go with."""
    found = [p for p, n in mine.items() if n >= min_faces and given_to.get(p, g) != g]
    return found if len(found) >= 2 else []


def _noise_sources(emb: Embeddings, groups: np.ndarray, judged: np.ndarray, centres: torch.Tensor,
                   folders: set[int]) -> dict[int, Counter]:
    """For each identity in `folders`, its judged faces counted by the identity whose centre
    lies nearest (of all): where the folder's mislabelled faces come from, the faces beyond
    the threshold included. One pass, reading only these folders' rows."""
    rows = judged & np.isin(groups, list(folders))
    sources: dict[int, Counter] = defaultdict(Counter)
    for _, (r, near) in emb.map_blocks(_block_nearest_centre, normalise(centres).numpy(), rows):
        for g, q in zip(groups[r].tolist(), np.asarray(near).tolist()):
            sources[g][q] += 1
    return sources


def _block_nearest_centre(block: np.ndarray, start: int, centres: np.ndarray, rows: np.ndarray) -> tuple:
    """This block's faces in `rows` and the group whose centre lies nearest each."""
    r = np.flatnonzero(rows[start:start + len(block)])
    if not len(r):
        return r + start, r
    near = torch.from_numpy(block[r]) @ torch.from_numpy(np.array(centres)).T  # Ray's arguments are read-only
    return r + start, near.argmax(1).numpy()


def _person_by_noise_sources(sources, mine: dict, g: int, candidates: list[int], given_to: dict) -> int | None:
    """Identity g (`mine`: its persons -> their faces there), left without a person of its
    own, between two or more persons other identities were given (`candidates`,
    _claimed_candidates): the one whose identity's folder draws its mislabelled faces from
    the same identities as g's folder (look-alikes of one person are confused with the same
    people; `_noise_sources`, the candidates' identities left out); None where none leads.
    On the face-model seed sweep (40% look-alike noise, seed 8) a folder held 6 faces of a
    look-alike and 5 of its own person, whose alias held 12: counting faces took the look-
    alike (a false merge and a missed one); the folder's other noise came from the alias's
    sources, not the look-alike's. The faces beyond the threshold count: there they form no
    person, which is why _tied_person_by_shared_noise cannot see them."""
    # Only persons with at least half the faces of g's largest are weighed: below that the
    # count decides. On the face-model sweep at 200 x 30 (30% look-alike noise, seed 2) a
    # folder's own person, 16 faces linked into a look-alike's person and given to that
    # folder, lost to a look-alike's 5 on 2 faces of shared noise: a false merge. All the
    # candidates' identities stay out of the count (look-alikes hold each other's faces).
    weighed = [p for p in candidates if 2 * mine[p] >= max(mine.values())]
    if len(weighed) < 2:
        return None
    owners = {given_to[p] for p in candidates} | {g}
    scores = {p: _shared_count(sources[g], sources[given_to[p]], owners) for p in weighed}
    best = max(weighed, key=lambda p: (scores[p], mine[p], -p))
    return best if scores[best] > max(scores[p] for p in weighed if p != best) else None


def _give_persons(faces_of: dict, min_faces: int, max_cells: int = 1 << 24) -> dict:
    """identity -> person: the assignment of persons to identities, each person to one
    identity at most, that keeps the most faces (a maximum-weight matching; weights: the
    faces of the person in the identity, where at least `min_faces`). Solved per connected
    part (identities that share persons: a few each); a part whose matrix would exceed
    `max_cells` (128 MiB) is matched largest first instead."""
    from scipy.optimize import linear_sum_assignment

    edges = [(g, p, n) for (g, p), n in faces_of.items() if n >= min_faces]
    idents = sorted({g for g, _, _ in edges})
    persons = sorted({p for _, p, _ in edges})
    index = {("g", g): i for i, g in enumerate(idents)}
    index.update({("p", p): len(idents) + i for i, p in enumerate(persons)})
    uf = _UnionFind(len(index))
    for g, p, _ in edges:
        uf.union(index["g", g], index["p", p])
    parts = defaultdict(list)
    for g, p, n in edges:
        parts[uf.find(index["g", g])].append((g, p, n))
    given = {}
    for part in parts.values():
        gs = sorted({g for g, _, _ in part})
        ps = sorted({p for _, p, _ in part})
        if len(gs) * len(ps) > max_cells:  # too large a matrix: largest first, each person once
            taken = set()
            for g, p, n in sorted(part, key=lambda e: (-e[2], e[0], e[1])):
                if g not in given and p not in taken:
                    given[g] = p
                    taken.add(p)
            continue
        row, col = {g: i for i, g in enumerate(gs)}, {p: j for j, p in enumerate(ps)}
        weight = np.zeros((len(gs), len(ps)))
        for g, p, n in part:
            weight[row[g], col[p]] = n
        for i, j in zip(*linear_sum_assignment(weight, maximize=True)):
            if weight[i, j] > 0:
                given[gs[i]] = ps[j]
    return given


def _link_same_person(sums: torch.Tensor, sizes: np.ndarray, same_person_angle: float,
                      neighbours: int = 8) -> np.ndarray:
    """Which clusters (their face sums and sizes, two faces or more) show one person: each
    is joined to those of its `neighbours` nearest centres whose underlying centres lie
    within `same_person_angle` (true_centre_cos). Returns a person label per cluster."""
    uf = _UnionFind(len(sizes))
    limit = np.cos(np.radians(same_person_angle))
    for rows, near, cos in _neighbour_cos(sums, torch.from_numpy(sizes.astype(np.float64)), neighbours):
        same = cos >= limit
        for i, j in zip(rows[same].tolist(), near[same].tolist()):
            uf.union(i, j)
    return np.array([uf.find(i) for i in range(len(sizes))])


def _neighbour_cos(sums: torch.Tensor, n: torch.Tensor, neighbours: int) -> Iterator[tuple]:
    """For a chunk of rows (face sums `sums`, counts `n`) at a time: (rows, each row's
    `neighbours` nearest other rows by centre, the cosine between their underlying centres
    (true_centre_cos; -1 against itself)), all (chunk, neighbours + 1)."""
    sums = sums.double()
    centres, within = normalise(sums).float(), _within(sums, n)
    k = min(neighbours + 1, len(n))
    chunk = max(1, (1 << 25) // max(1, len(n)))
    for s in range(0, len(n), chunk):
        near = (centres[s:s + chunk] @ centres.T).topk(k, dim=1).indices
        rows = torch.arange(s, s + len(near))[:, None].expand_as(near)
        cos = _underlying_cos(sums[rows], n[rows], within[rows], sums[near], n[near], within[near])
        yield rows, near, torch.where(near != rows, cos, torch.full_like(cos, -1.0))


# merge_same_person_angle 0: this share of the median angle between identities' underlying
# centres and their nearest other's. With the bootstrap started from a face model (benchmarks/
# make_face_prior.py), on 29 cases of the seed sweep (30-45% noise) the nearest distinct
# identities lay 0.63 of that median apart at the least, one person filed twice 0.35 at the
# most (seed 3's pair at 40% look-alike noise; the next 0.17): 0.45 lies between, nearer the
# duplicates, since a false merge is the worse error. A third left that pair apart. A bootstrap
# trained from nothing leaves look-alikes' folders 4-15 deg apart at 45% look-alike noise,
# against a median of 42-57: keep the fixed 10 there.
SAME_PERSON_SHARE_OF_NEAREST = 0.45


def derived_same_person_angle(emb: Embeddings, groups: np.ndarray, faces: np.ndarray, num: int,
                              neighbours: int = 8) -> tuple[float, dict]:
    """SAME_PERSON_SHARE_OF_NEAREST times the median, over identities with two faces or more
    among `faces`, of the angle between their underlying centre and their nearest other's;
    with the figures it came from."""
    sums, counts = group_sums(emb, groups, faces, num)
    weighed = counts >= 2
    if int(weighed.sum()) < 2:
        return 10.0, {"rule": "fewer than two identities to weigh: 10 deg"}
    best = torch.cat([cos.max(1).values for _, _, cos in
                      _neighbour_cos(sums[weighed], counts[weighed].double(), neighbours)])
    median = float(np.median(angle_deg(best.clamp(-1.0, 1.0).numpy())))
    return SAME_PERSON_SHARE_OF_NEAREST * median, {
        "rule": f"{SAME_PERSON_SHARE_OF_NEAREST:.3g} of the median angle between identities and their nearest other",
        "median_nearest_identity_deg": round(median, 2), "identities": int(weighed.sum())}


def _within(sums: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Each row's mean dot product over pairs of its unit faces, from their sum and count."""
    return ((sums * sums).sum(-1) - n) / (n * (n - 1)).clamp(min=1)


def _underlying_cos(sums_a, n_a, within_a, sums_b, n_b, within_b) -> torch.Tensor:
    """true_centre_cos_from_sums row by row (broadcast, many pairs at once), from each side's
    sum of unit faces, count and _within; -1 where the spreads give no estimate."""
    cross = (sums_a * sums_b).sum(-1) / (n_a * n_b)
    spread = (within_a * within_b).clamp(min=0).sqrt()
    return torch.where(spread > 0, cross / spread.clamp(min=1e-12), torch.full_like(cross, -1.0))


def _block_nearest_subcentre(block: np.ndarray, start: int, sub: np.ndarray, groups: np.ndarray) -> np.ndarray:
    rows = groups[start:start + len(block)]
    return torch.einsum("nd,nkd->nk", torch.from_numpy(block), torch.from_numpy(sub[rows])).argmax(1).numpy()


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


@dataclass
class Merge:
    into: int
    groups: list[int]
    identities: list[str] = field(default_factory=list)


class MergeIdentities(DenoiseStep):
    """Join identities that are one person filed under two ids. Faces are kept; their group
    becomes the smallest label of the merged set.

    Two identities merge only with evidence that survives label noise and look-alikes:
      * their centres are each other's nearest (mutual nearest neighbours), within
        `max_angle` (0: `relative` times the median angle of the kept faces to their own
        centre, as measured by IntraClassOutliers, which must run first);
      * each has at least `min_faces` kept faces, and on average at least `min_crossing` of
        them lie nearer the other's centre than their own (leave-one-out: each face against
        its identity's centre without it). A bootstrap model trained on two ids of one person
        cannot tell their photos apart, so their faces intermix (demo: 27-68% each way);
        distinct people barely cross (at most 6% with uniform label noise). The bar is 10%,
        not more: a bootstrap model learns some duplicates partly apart (seed sweep, 60 cases:
        the 111 duplicate candidates within `same_person_angle` crossed 0.16-0.90 on average,
        the lowest 0.16 - 3 of 20 faces - 0.20 and 0.22, while every distinct pair within it
        crossed 0.31 or more: the underlying-centre test below keeps look-alikes apart, not
        this one). The average,
        not each way: the larger identity's faces sit nearer their own better-estimated
        centre, so its share falls with the size ratio (synthetic 512-d, 100K faces: 2 of 7
        duplicate pairs crossed 0.10-0.16 one way and 0.70-0.78 the other);
      * and their underlying centres (`true_centre_cos`, free of sample size) lie within
        `same_person_angle`. Look-alikes whose folders hold each other's faces intermix too
        (demo, 50% label noise from 3 look-alikes per identity: 8 such pairs crossed 20-35%
        each way), but their centres stay 11.7-19 deg apart (one more, 9.6, joined one
        person's kept faces); duplicates' lay 0-2.5 deg apart on the demo sweep (10-50%
        uniform and confusable noise), 8.8 for identities of 6 and 9 faces (the CI demo:
        few faces make the estimate noisy), about 0 on synthetic sets; distinct mutual
        nearest identities with uniform noise 26 deg and more."""

    name = "merge_identities"
    reasons = ()

    def __init__(self, max_angle: float = 0.0, relative: float = 2.0, min_crossing: float = 0.1,
                 min_faces: int = FEWEST_FACES_TO_WEIGH, same_person_angle: float = 10.0):
        super().__init__()
        self.max_angle, self.relative, self.min_crossing, self.min_faces = max_angle, relative, min_crossing, min_faces
        self.same_person_angle = same_person_angle
        self.merges: list[Merge] = []
        self.candidates: list[dict] = []

    def apply(self, data: EmbeddedSet) -> None:
        kept = data.kept
        if self.max_angle <= 0:
            self.max_angle = float(self.relative * np.median(_kept_angles(data, "merge_max_angle")))
        self.same_person_angle = _same_person_angle(data, self.same_person_angle)
        num = int(data.groups.max()) + 1
        emb = data.embeddings
        groups = data.groups.astype(np.int64)
        sums, counts = group_sums(emb, groups, kept, num)
        centres, counts = normalise(sums), counts.numpy()
        present = np.flatnonzero(counts > 0)
        pc = centres.numpy()[present]
        nearest_of, angle = nearest(pc, pc, exclude_self=True) if len(present) > 1 else (np.zeros(0, np.int64), np.zeros(0))
        rows_of = _rows_by_group(data.groups, kept)
        uf = _UnionFind(num)
        pairs = [(a, int(nearest_of[a])) for a in range(len(present))
                 if a < nearest_of[a] and nearest_of[nearest_of[a]] == a and angle[a] <= self.max_angle]
        # The evidence in one pass over the embeddings, shard by shard (parallel under Ray):
        # each candidate's faces nearer its partner's centre than their own. Mutual nearest
        # pairs are disjoint, so each group has at most one partner.
        partner = np.full(num, -1, np.int64)
        for a, b in pairs:
            partner[present[a]], partner[present[b]] = present[b], present[a]
        crossed = np.zeros(num)
        if pairs:
            for _, (ids, n) in emb.map_blocks(_block_crossing, groups, kept, partner, centres.numpy(), sums.numpy()):
                crossed[ids] += n
        rejected = 0
        for a, b in pairs:
            ga, gb = int(present[a]), int(present[b])
            na, nb = int(counts[ga]), int(counts[gb])
            if min(na, nb) < self.min_faces:  # no faces to weigh: no evidence
                rejected += 1
                continue
            crossing = (crossed[ga] / na, crossed[gb] / nb)
            true_angle = float(angle_deg(np.float64(true_centre_cos_from_sums(sums[ga], na, sums[gb], nb))))
            merge = sum(crossing) / 2 >= self.min_crossing and true_angle <= self.same_person_angle
            self.candidates.append({"groups": [ga, gb], "centre_angle": round(float(angle[a]), 2),
                                    "true_centre_angle": round(true_angle, 2), "faces": [na, nb],
                                    "crossing": [round(c, 3) for c in crossing], "merged": bool(merge)})
            if merge:
                uf.union(ga, gb)
            else:
                rejected += 1
        candidates = len(pairs)
        root = np.array([uf.find(g) for g in range(num)])
        members: dict[int, list[int]] = {}
        for g in present:
            members.setdefault(int(root[g]), []).append(int(g))
        for into, gs in sorted(members.items()):
            if len(gs) > 1:
                idents = sorted({str(x) for g in gs for x in data.identities[rows_of[g]]})
                self.merges.append(Merge(into, gs, idents))
        data.groups = root[data.groups]
        self.figures = {"max_angle": round(self.max_angle, 2), "min_crossing": self.min_crossing,
                        "same_person_angle": round(self.same_person_angle, 2),
                        "mutual_nearest_within_max_angle": candidates, "refused_for_too_little_evidence": rejected,
                        "merged_sets": len(self.merges),
                        "identities_merged_away": sum(len(m.groups) - 1 for m in self.merges)}


def _kept_angles(data: EmbeddedSet, setting: str) -> np.ndarray:
    """The kept faces' angles to their centre, which a derived (0) `setting` is computed from."""
    angles = data.angles[data.kept & np.isfinite(data.angles)]
    if not len(angles):
        raise ValueError(f"{setting} 0 derives it from face-to-centre angles: run IntraClassOutliers first "
                         "(or set an angle)")
    return angles


def _same_person_angle(data: EmbeddedSet, configured: float) -> float:
    """`configured`, or with 0 the angle IntraClassOutliers derived for this data."""
    if configured > 0:
        return configured
    if data.same_person_angle is None:
        raise ValueError("merge_same_person_angle 0 derives it from the identities' spread: run "
                         "IntraClassOutliers first (or set an angle)")
    return float(data.same_person_angle)


def _block_crossing(block: np.ndarray, start: int, groups: np.ndarray, mask: np.ndarray, partner: np.ndarray,
                    centres: np.ndarray, sums: np.ndarray) -> tuple:
    """Per merge candidate in this block, how many of its faces lie nearer its partner's
    centre than their own identity's centre, each face compared with the centre of the
    others (leave-one-out: a face is part of its own centre's mean, which in many dimensions
    would alone keep it on its side)."""
    rows = start + np.flatnonzero(mask[start:start + len(block)])
    rows = rows[partner[groups[rows]] >= 0]
    g = groups[rows]
    faces = torch.from_numpy(block[rows - start])
    own = normalise(torch.from_numpy(sums[g]) - faces)
    nearer = (faces * torch.from_numpy(centres[partner[g]])).sum(1) > (faces * own).sum(1)
    ids, inverse = np.unique(g, return_inverse=True)
    return ids, np.bincount(inverse.reshape(-1), weights=nearer.numpy(), minlength=len(ids))


def true_centre_cos(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """The cosine between two identities' underlying centres, estimated from their (unit)
    faces without the pull of sample size: the mean dot product over pairs across the two,
    over the geometric mean of the mean dot products over pairs within each. The normalised
    mean of n faces sits nearer its own faces the larger n is, so raw centre angles and
    crossing shares are lopsided when the sizes differ; this estimate is not (a person filed
    twice scores about 1 whatever the split). -1 when either has no coherent spread."""
    return true_centre_cos_from_sums(fa.sum(0), len(fa), fb.sum(0), len(fb))


def true_centre_cos_from_sums(sa: torch.Tensor, na: int, sb: torch.Tensor, nb: int) -> float:
    """true_centre_cos from each identity's sum of unit faces and count: every mean of dot
    products over pairs is a function of the sums alone."""
    sa, sb = sa.double(), sb.double()
    if na < 2 or nb < 2:
        return -1.0
    within_a = (float(sa @ sa) - na) / (na * (na - 1))
    within_b = (float(sb @ sb) - nb) / (nb * (nb - 1))
    if within_a <= 0 or within_b <= 0:
        return -1.0
    return min(1.0, float(sa @ sb) / (na * nb) / np.sqrt(within_a * within_b))


def _rows_by_group(groups: np.ndarray, kept: np.ndarray) -> dict[int, np.ndarray]:
    """Each group's kept rows (a sort, not a scan of all rows per group)."""
    rows = np.flatnonzero(kept)
    order = rows[np.argsort(groups[rows], kind="stable")]
    ids, starts = np.unique(groups[order], return_index=True)
    return dict(zip(ids.tolist(), np.split(order, starts[1:])))


class EvaluationOverlap(DenoiseStep):
    """Drop identities that are people in the evaluation sets, and those named in `names`
    (an optional list, e.g. LFW's names where the source ids are names).

    An evaluation face counts for the identity whose centre is nearest, when it lies within
    `max_angle` of it and clearly nearer it than any other identity: angle to the nearest /
    angle to the second nearest <= `max_ratio` (Lowe's ratio test). An identity with at
    least `min_faces` such faces is a person of the evaluation set. `max_angle` 0: the
    farthest kept face's angle to its own centre (IntraClassOutliers must run first).
    A look-alike's evaluation faces lie near two or more training identities; a training
    person's lie near one. On the refinement sweep's cases the ratio test found 5-6 of each
    overlap person's 6 faces with no other identity reaching 1, where a radius alone (the
    kept faces' 90th-percentile angle) missed one person of 3 after a second round and let
    a look-alike in after one round at 50% noise. Where a weak model leaves the ratio test
    too few faces, the evaluation faces nearest an identity that show its person - their
    underlying centres within `same_person_angle`, as MergeIdentities joins one person
    filed twice - make it an evaluation person too (_same_person)."""

    name = "evaluation_overlap"
    reasons = ("overlaps_evaluation_set", "named_in_evaluation_list")

    def __init__(self, eval_embeddings: np.ndarray | None, max_angle: float, min_faces: int,
                 names: set[str] | None = None, max_ratio: float = 0.5, same_person_angle: float = 10.0,
                 eval_people: np.ndarray | None = None):
        super().__init__()
        self.eval_embeddings, self.max_angle, self.min_faces = eval_embeddings, max_angle, min_faces
        self.names, self.max_ratio, self.same_person_angle = names or set(), max_ratio, same_person_angle
        self.eval_people = eval_people

    def _by_evaluation_person(self, sums: torch.Tensor, counts: np.ndarray, present: np.ndarray,
                              neighbours: int = 8, chunk_elements: int = 1 << 25) -> set[int]:
        """The identities whose underlying centre lies within `same_person_angle` of an
        evaluation person's, its faces as the sets group them (`eval_people`, at least
        `min_faces`): one person filed twice, once for training and once for evaluation, as
        MergeIdentities weighs two identities. All of a person's faces count together,
        wherever their nearest identity lies: a weak model spreads them over several (seed
        sweep, 50% uniform noise: an overlap person's 9-12 faces nearest its identity among
        look-alikes' faces, ratio tests 0.41-1.0, and 3 of 10 seeds kept it). One identity
        only: where a second also lies within the angle, the person is no one's. A model
        trained a few steps puts every centre within a few degrees of every other (the
        shared-nothing rehearsal's demo: without this, every identity was an evaluation
        person); one person filed twice is one identity by now (MergeIdentities runs first)."""
        if self.eval_people is None or not len(present):
            return set()
        people, person, size = np.unique(self.eval_people, return_inverse=True, return_counts=True)
        eval_sums = torch.zeros(len(people), sums.shape[1], dtype=torch.float64).index_add_(
            0, torch.from_numpy(person.reshape(-1).astype(np.int64)), torch.from_numpy(self.eval_embeddings).double())
        weighed = np.flatnonzero(size >= max(2, self.min_faces))
        if not len(weighed):
            return set()
        e_sums, e_n = eval_sums[weighed], torch.from_numpy(size[weighed].astype(np.float64))
        g_sums, g_n = sums[present].double(), torch.from_numpy(counts[present].astype(np.float64))
        # Each person's nearest identities, a chunk of persons at a time: an identification
        # set's thousands of persons against 85K identities would not fit at once.
        g_centres, k = normalise(g_sums).float(), min(neighbours, len(present))
        chunk = max(1, chunk_elements // len(present))
        near = torch.cat([(normalise(e_sums[s:s + chunk]).float() @ g_centres.T).topk(k, dim=1).indices
                          for s in range(0, len(weighed), chunk)])
        within_e, within_g = _within(e_sums, e_n), _within(g_sums, g_n)
        cos = _underlying_cos(e_sums[:, None, :], e_n[:, None], within_e[:, None],
                              g_sums[near], g_n[near], within_g[near])
        cos = torch.where(g_n[near] >= 2, cos, torch.full_like(cos, -1.0))
        angle = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
        if k < 2:  # one identity: nothing to be clearly nearer than
            angle = torch.cat([angle, torch.full_like(angle, 180.0)], 1)
        two = angle.topk(2, dim=1, largest=False)
        best, second = two.values[:, 0], two.values[:, 1]
        found = (best <= self.same_person_angle) & (second > self.same_person_angle)
        nearest_identity = near.gather(1, two.indices[:, :1].clamp(max=near.shape[1] - 1))[:, 0]
        return {int(present[i]) for i in nearest_identity[found].tolist()}

    def _same_person(self, sums: torch.Tensor, counts: np.ndarray, present: np.ndarray, closest: np.ndarray,
                     within: np.ndarray, ratio_hits: np.ndarray) -> set[int]:
        """The identities whose nearest evaluation faces (within the angle, `min_faces` or
        more, at least one of them passing the ratio test) show their person: the two
        underlying centres within `same_person_angle` (true_centre_cos: one person filed
        twice, once for training and once for evaluation, as MergeIdentities weighs two
        identities). Where a weak model puts the second-nearest identity close, the ratio
        test passes too few of them (refinement sweep, 40% uniform noise, seed 10: 2 of the
        overlap person's 6 faces, ratios 0.27-0.79; the underlying centres 0 deg apart). Over
        the sweep's 60 cases, 2 other identities' nearest evaluation faces (3 and 6 of a
        held-out look-alike) lay within 10 deg too, none passing the ratio test: hence at
        least one must."""
        eval_sums, eval_counts = _eval_sums(self.eval_embeddings, closest, within, len(present))
        found = set()
        for i in np.flatnonzero((eval_counts >= self.min_faces) & (ratio_hits >= 1)).tolist():
            g = int(present[i])
            cos = true_centre_cos_from_sums(sums[g].double(), int(counts[g]), eval_sums[i], int(eval_counts[i]))
            if angle_deg(np.float64(cos)) <= self.same_person_angle:
                found.add(g)
        return found

    def apply(self, data: EmbeddedSet) -> None:
        kept = data.kept
        flagged: set[int] = set()
        by_same_person: set[str] = set()  # found by the same-person test alone (not the ratio test)
        by_person: set[str] = set()  # found only by an evaluation person's faces taken together
        derived = {"rule": "configured"}
        if self.max_angle <= 0:
            self.max_angle = float(_kept_angles(data, "overlap_max_angle").max())
            derived = {"rule": "the farthest kept face's angle to its centre"}
        self.same_person_angle = _same_person_angle(data, self.same_person_angle)
        if self.eval_embeddings is not None and len(self.eval_embeddings):
            num = int(data.groups.max()) + 1
            sums, counts = group_sums(data.embeddings, data.groups.astype(np.int64), kept, num)
            counts = counts.numpy()
            present = np.flatnonzero(counts > 0)
            closest, angle, second = nearest(self.eval_embeddings, normalise(sums).numpy()[present], second=True)
            within = angle <= self.max_angle
            counted = within & (angle <= self.max_ratio * second)
            hits = np.bincount(closest[counted], minlength=len(present))
            flagged = {int(g) for g in present[hits >= self.min_faces]}
            same = self._same_person(sums, counts, present, closest, within, hits) - flagged
            whole = self._by_evaluation_person(sums, counts, present) - flagged - same
            by_same_person = {str(x) for x in data.identities[kept & np.isin(data.groups, list(same))]}
            by_person = {str(x) for x in data.identities[kept & np.isin(data.groups, list(whole))]}
            flagged |= same | whole
            rows = np.flatnonzero(kept & np.isin(data.groups, list(flagged)))
            self.drop(data, rows, self.reasons[0],
                      f">= {self.min_faces} evaluation faces nearest it within {self.max_angle:.1f} deg of the centre: "
                      f"at most {self.max_ratio:g} of their angle to any other identity, or their person's centre "
                      f"within {self.same_person_angle:g} deg of its own")
        named = np.flatnonzero(data.kept & np.isin(data.identities, list(self.names)))
        named_groups = set(np.unique(data.groups[named]).tolist())
        self.drop(data, np.flatnonzero(data.kept & np.isin(data.groups, list(named_groups))), self.reasons[1])
        self.figures = {"max_angle": round(self.max_angle, 2), "max_angle_from": derived, "max_ratio": self.max_ratio,
                        "min_faces": self.min_faces, "same_person_angle": round(self.same_person_angle, 2),
                        "identities_by_same_person": sorted(by_same_person),
                        "identities_by_evaluation_person": sorted(by_person),
                        "identities_by_embedding": sorted({str(x) for x in data.identities[np.isin(data.groups, list(flagged))]}),
                        "identities_by_name": sorted({str(x) for x in data.identities[np.isin(data.groups, list(named_groups))]})}


def _eval_sums(eval_embeddings: np.ndarray, closest: np.ndarray, mask: np.ndarray, size: int) -> tuple:
    """Per nearest identity (index into the present ones): the sum and count of the masked
    evaluation faces nearest it."""
    sums = np.zeros((size, eval_embeddings.shape[1]), np.float64)
    np.add.at(sums, closest[mask], eval_embeddings[mask].astype(np.float64))
    return torch.from_numpy(sums), np.bincount(closest[mask], minlength=size)


def nearest(a: np.ndarray, b: np.ndarray, exclude_self: bool = False, chunk_elements: int = 1 << 25,
            second: bool = False):
    """For each row of `a`, its nearest row of `b` and the angle to it (and with `second`, the
    angle to the second nearest; 180 when `b` has one row). A row of `a` that is also row i
    of `b` skips itself with `exclude_self`. In chunks of rows of `a` whose similarities take
    `chunk_elements` floats (128 MiB), whatever the sizes: 85K centres against each other is
    never an 85K x 85K matrix."""
    a_t, b_t = torch.from_numpy(np.asarray(a, np.float32)), torch.from_numpy(np.asarray(b, np.float32))
    chunk = max(1, chunk_elements // max(1, len(b_t)))
    index, cos = np.zeros(len(a_t), np.int64), np.zeros(len(a_t), np.float32)
    cos2 = np.full(len(a_t), -1.0, np.float32)
    for s in range(0, len(a_t), chunk):
        sims = a_t[s:s + chunk] @ b_t.T
        if exclude_self:
            rows = torch.arange(s, min(s + chunk, len(a_t)))
            sims[rows - s, rows] = -2
        top = sims.topk(min(2, sims.shape[1]), dim=1)
        index[s:s + chunk], cos[s:s + chunk] = top.indices[:, 0].numpy(), top.values[:, 0].numpy()
        if sims.shape[1] > 1:
            cos2[s:s + chunk] = top.values[:, 1].numpy()
    if second:
        return index, angle_deg(cos), angle_deg(cos2)
    return index, angle_deg(cos)


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

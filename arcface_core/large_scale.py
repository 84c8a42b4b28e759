"""Block math of large-scale verification and identification (torch; no I/O).

At MegaFace / Trillion-Pairs / MFR-ALL scale the score matrix cannot be gathered (a
trillion float32 scores is 4 TB), so it is cut into blocks and each block is reduced to what
the metrics need; the reductions merge exactly, whatever the blocking:

* **Verification** (TAR at FAR, the rule of `arcface_core.metrics.tar_at_far`: the largest
  TAR whose FAR does not exceed the target, all tied scores taken together). With `n`
  impostor pairs, the target allows at most `m` false accepts (`allowed_false_accepts`, the
  same floating-point test as `tar_at_far`). Accepting scores `>= t` keeps at most `m`
  impostors exactly when `t` lies above the (m+1)-th largest impostor score `v`; the lowest
  such threshold accepts every genuine score `> v`, so TAR = #(genuine > v) / #genuine.
  Genuine pairs (same label) are few and kept exactly; of the impostors a block keeps only
  its `k = m + 1` largest scores (the k-th largest of a union is the k-th largest of the
  union of each part's k largest). When `k` is too large to keep (FAR 1e-2 over 10^12
  pairs), the k-th largest is found by radix selection on the scores' bit patterns: a
  first pass counts impostor scores per value of their top 16 bits, which fixes the bin of
  the k-th largest and its rank inside the bin; a second pass counts the low 16 bits of the
  scores in that bin only, which fixes the exact 32-bit value. Two 65,536-bin histograms
  per task, exact for any k and any ties.
* **Identification** (1:N): per probe, the largest non-mate scores over the gallery (top-k,
  merged exactly across gallery blocks) and the best mate score. The mate's rank is 1 + the
  number of non-mates scoring at least as high (ties count against, as in
  `metrics.open_set_identification` and `metrics.identification_rank1`), so rank <= r
  exactly when the r-th best non-mate scores below the mate.

Scores are float32 cosine similarities of L2-normalised features (`similarity`): the same
function computes every block, so a block's scores are the same numbers the full matrix
holds. Labels are int64; a negative label marks an image of nobody else in the set (a
distractor): it never forms a genuine pair, not even with another negative label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

BINS = 1 << 16  # radix selection: 16 bits per pass, two passes cover a float32
NEG_INF = float("-inf")


def normalize(features, device="cpu") -> torch.Tensor:
    """float32 L2-normalised rows on `device`; NaN or infinite features are refused."""
    x = torch.as_tensor(np.asarray(features, np.float32) if not torch.is_tensor(features) else features)
    x = x.to(device=device, dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values")
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


def similarity(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of normalised rows, float32."""
    return left @ right.T


# -- the threshold rule ----------------------------------------------------------------------

def allowed_false_accepts(far: float, impostors: int) -> int | None:
    """The most false accepts a FAR target allows over `impostors` pairs, by the very test
    `metrics.tar_at_far` applies (fp / n <= far + 1e-12 in float64); None when the target is
    finer than 1 / n (tar_at_far leaves such targets out)."""
    if impostors <= 0 or far < 1.0 / impostors:
        return None
    m = min(int(math.floor(far * impostors)), impostors)
    while m + 1 <= impostors and (m + 1) / impostors <= far + 1e-12:
        m += 1
    while m > 0 and m / impostors > far + 1e-12:
        m -= 1
    return m


def pair_counts(left_labels: np.ndarray, right_labels: np.ndarray | None = None) -> tuple[int, int]:
    """(genuine, impostor) pair counts: all-to-all pairs i < j when `right_labels` is None,
    else every (left, right) pair. Computed from label counts, before any score."""
    left = np.asarray(left_labels, np.int64)
    if right_labels is None:
        total = len(left) * (len(left) - 1) // 2
        _, counts = np.unique(left[left >= 0], return_counts=True)
        genuine = int((counts * (counts - 1) // 2).sum())
    else:
        right = np.asarray(right_labels, np.int64)
        total = len(left) * len(right)
        ids_l, cnt_l = np.unique(left[left >= 0], return_counts=True)
        ids_r, cnt_r = np.unique(right[right >= 0], return_counts=True)
        common, il, ir = np.intersect1d(ids_l, ids_r, return_indices=True)
        genuine = int((cnt_l[il].astype(np.int64) * cnt_r[ir]).sum())
    return genuine, total - genuine


# -- bit patterns of float32 scores, ordered like the scores -------------------------------

def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values; -0.0 is keyed as +0.0 (equal
    scores must have equal keys: radix selection compares keys)."""
    bits = (values + 0.0).contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def key_value(key: int) -> float:
    """The float32 value whose `ordered_keys` key is `key`."""
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return float(np.array([bits], np.int32).view(np.float32)[0])


def high_bin(keys: torch.Tensor) -> torch.Tensor:
    return (keys >> 16).long() + BINS // 2


def low_bin(keys: torch.Tensor) -> torch.Tensor:
    return (keys & 0xFFFF).long()


def kth_largest_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """(bin, rank inside the bin) of the k-th largest element given per-bin counts."""
    above = np.cumsum(counts[::-1])  # above[i]: elements in the top i+1 bins
    top = int(np.searchsorted(above, k))  # first i with above[i] >= k
    bin_index = len(counts) - 1 - top
    return bin_index, k - (int(above[top - 1]) if top > 0 else 0)


# -- verification ----------------------------------------------------------------------------

@dataclass
class VerificationPlan:
    """What every block must keep: the impostor top-k (k = the largest order statistic a
    FAR needs that is within `topk_limit`), whether to count the coarse histogram (FARs
    whose k is beyond the limit), and, in the second pass, the high-16-bit bins to refine."""
    top_k: int = 0
    coarse: bool = False
    refine_bins: tuple[int, ...] = ()
    second_pass: bool = False  # only the fine histograms are wanted (no genuine, no top-k)


@dataclass
class VerificationPartial:
    """A block's reduction, or (`VerificationMerge.partial`) the fold of all blocks'."""
    genuine: list[np.ndarray] = field(default_factory=list)  # float32 genuine scores
    impostors: int = 0
    top: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # impostor top-k, descending
    coarse: np.ndarray | None = None  # (BINS,) impostor counts per high-16-bit bin
    fine: dict[int, np.ndarray] = field(default_factory=dict)  # high bin -> (BINS,) counts of low bits


class TopK:
    """The k largest of all the values added (exact: the k-th largest of a union is the k-th
    largest of the union of each part's k largest), in one buffer of 2k float32 allocated
    once. Values above the running k-th largest are appended; a full buffer is cut back to its
    k largest by an in-place partition. Merging a k-list costs a pass over it and, when it
    brings new values, a partition of at most 2k: no k-sized temporaries per merge, so
    the driver's heap does not fill with freed merge buffers (torch.topk over a concatenation
    allocated 3.5 k-lists a merge and was 50x slower at k = 1.25M)."""

    def __init__(self, k: int):
        self.k = k
        self.buffer = np.empty(2 * k, np.float32)
        self.size = 0
        self.floor = NEG_INF  # the k-th largest so far, once at least k values were kept

    def add(self, values) -> None:
        if not self.k:
            return
        values = np.asarray(values, np.float32).reshape(-1)
        values = values[values > self.floor]  # a value <= the k-th largest cannot enter the top k
        while len(values):
            take = min(len(values), len(self.buffer) - self.size)
            self.buffer[self.size:self.size + take] = values[:take]
            self.size += take
            values = values[take:]
            if self.size == len(self.buffer):
                self._cut()
                values = values[values > self.floor]

    def _cut(self) -> None:
        """Keep the k largest in buffer[:k]."""
        n, k = self.size, self.k
        if n <= k:
            return
        self.buffer[:n].partition(n - k)  # in place: the k largest in [n - k, n), the k-th at n - k
        self.floor = float(self.buffer[n - k])
        self.buffer[:n - k] = self.buffer[k:n]  # n <= 2k: the two ranges do not overlap
        self.size = k

    def descending(self) -> torch.Tensor:
        """The k largest (fewer if fewer were added), descending."""
        self._cut()
        kept = self.buffer[:self.size]
        kept.sort()
        return torch.from_numpy(kept[::-1].copy())


class VerificationMerge:
    """The driver's fold of block reductions, exact whatever the order, in memory that does
    not grow with the number of blocks: the genuine scores (few; copied), the impostor count,
    the histograms summed in place, the impostor top-k in a `TopK`. Nothing of a result is
    kept by reference: a result Ray hands back holds zero-copy views of its object-store
    buffer, and keeping one array of it (its genuine scores) would pin the whole result,
    top-k included, in the store and in the driver's resident memory until the end of the run."""

    def __init__(self, top_k: int):
        self.merged = VerificationPartial()
        self.top = TopK(top_k)

    def add(self, part: VerificationPartial) -> None:
        merged = self.merged
        merged.genuine.extend(np.array(g, np.float32) for g in part.genuine)
        merged.impostors += part.impostors
        self.top.add(part.top.cpu().numpy())
        if part.coarse is not None:
            if merged.coarse is None:
                merged.coarse = np.zeros(BINS, np.int64)
            merged.coarse += part.coarse
        for b, counts in part.fine.items():
            if b not in merged.fine:
                merged.fine[b] = np.zeros(BINS, np.int64)
            merged.fine[b] += counts

    def partial(self) -> VerificationPartial:
        self.merged.top = self.top.descending()
        return self.merged


def merge_top(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of two descending lists (1-D, float32), descending."""
    both = torch.cat([a.to(b.device, torch.float32), b.float()])
    if len(both) <= k:
        return torch.sort(both, descending=True).values
    return torch.topk(both, k).values


def same_label_pairs(left_labels: np.ndarray, right_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of every pair with the same non-negative label, found from the labels
    alone (sorted search), so a block never builds a rows x cols label mask."""
    left, right = np.asarray(left_labels, np.int64), np.asarray(right_labels, np.int64)
    order = np.argsort(right, kind="stable")
    ordered = right[order]
    lo, hi = np.searchsorted(ordered, left, "left"), np.searchsorted(ordered, left, "right")
    counts = np.where(left >= 0, hi - lo, 0)
    rows = np.repeat(np.arange(len(left)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, order[np.repeat(lo, counts) + within]


def reduce_verification_block(left: torch.Tensor, left_labels, right: torch.Tensor, right_labels,
                              plan: VerificationPlan, diagonal: bool = False, impostors: bool = True,
                              tile_elements: int = 1 << 22) -> VerificationPartial:
    """Reduce the block left x right (normalised features on one device). `diagonal`: left
    and right are the same rows of an all-to-all set (pairs i < j only). `impostors=False`:
    keep only the genuine scores (e.g. MegaFace's probe-probe pairs, whose impostors the
    protocol does not count). Rows are processed in tiles of about `tile_elements` scores,
    so memory is bounded by the tile, not by the block.

    Per tile: the genuine scores are gathered at their (sparse) positions, then overwritten
    with -inf together with the pairs that do not count (j <= i on the diagonal), so every
    finite score left is an impostor. The top-k: the first tile by torch.topk, every later
    one only over the scores above the running k-th largest (usually a handful). The
    histograms count every score and drop the -inf bin, which no real score reaches."""
    device = left.device
    rows, cols = same_label_pairs(left_labels, right_labels)
    if diagonal:
        rows, cols = rows[cols > rows], cols[cols > rows]
    out = VerificationPartial()
    want_coarse = plan.coarse and impostors and not plan.second_pass
    coarse = torch.zeros(BINS, dtype=torch.long, device=device) if want_coarse else None
    fine = {b: torch.zeros(BINS, dtype=torch.long, device=device) for b in plan.refine_bins} if impostors else {}
    top = torch.empty(0, device=device)
    floor = NEG_INF  # the running k-th largest impostor score, once k are kept
    rows_per_tile = max(1, tile_elements // max(1, len(right)))
    for start in range(0, len(left), rows_per_tile):
        stop = min(start + rows_per_tile, len(left))
        scores = similarity(left[start:stop], right)
        in_tile = (rows >= start) & (rows < stop)
        g_rows = torch.as_tensor(rows[in_tile] - start, device=device)
        g_cols = torch.as_tensor(cols[in_tile], device=device)
        if not plan.second_pass:
            out.genuine.append(scores[g_rows, g_cols].cpu().numpy())
        if not impostors:
            continue
        scores[g_rows, g_cols] = NEG_INF
        counted = scores.numel()
        if diagonal:  # only j > i: right index > left index (start + tile row)
            upper = torch.arange(len(right), device=device)[None, :] > \
                torch.arange(start, stop, device=device)[:, None]
            scores.masked_fill_(~upper, NEG_INF)
            counted = int(upper.sum())
        if not plan.second_pass:
            out.impostors += counted - int(in_tile.sum())
            if plan.top_k:
                candidates = scores.reshape(-1) if floor == NEG_INF else scores[scores > floor]
                if candidates.numel():
                    kept = torch.topk(candidates, min(plan.top_k, candidates.numel())).values
                    top = merge_top(top, kept[kept > NEG_INF], plan.top_k)
                    if len(top) == plan.top_k:
                        floor = float(top[-1])
        if coarse is not None or fine:
            keys = ordered_keys(scores.reshape(-1))
            high = high_bin(keys)
            if coarse is not None:
                coarse += torch.bincount(high, minlength=BINS)
            for b, counts in fine.items():
                counts += torch.bincount(low_bin(keys[high == b]), minlength=BINS)
    if coarse is not None:
        coarse[int(high_bin(ordered_keys(torch.tensor([NEG_INF]))))] = 0  # the pairs that do not count
    out.coarse = coarse.cpu().numpy() if coarse is not None else None
    out.fine = {b: counts.cpu().numpy() for b, counts in fine.items()}
    out.top = top.cpu()
    return out


@dataclass
class FarTarget:
    far: float
    allowed: int  # false accepts allowed (m); the threshold sits above the (m+1)-th largest impostor
    by_histogram: bool


def plan_targets(fars, impostors: int, topk_limit: int) -> list[FarTarget]:
    """The FAR targets that can be measured over `impostors` pairs, each with how its
    order statistic is found (kept top-k up to `topk_limit`, radix selection beyond)."""
    out = []
    for far in fars:
        m = allowed_false_accepts(float(far), impostors)
        if m is not None:
            out.append(FarTarget(float(far), m, m + 1 > topk_limit))
    return out


def first_pass_plan(targets: list[FarTarget], impostors: int) -> VerificationPlan:
    needed = [min(t.allowed + 1, impostors) for t in targets if not t.by_histogram]
    return VerificationPlan(top_k=max(needed, default=0), coarse=any(t.by_histogram for t in targets))


def second_pass_plan(targets: list[FarTarget], merged: VerificationPartial) -> VerificationPlan | None:
    """The high-16-bit bins that hold the order statistics of the histogram targets (None
    when no target needs a second pass: their k exceeds the impostor count)."""
    bins = {kth_largest_bin(merged.coarse, t.allowed + 1)[0] for t in targets
            if t.by_histogram and t.allowed + 1 <= merged.impostors}
    return VerificationPlan(refine_bins=tuple(sorted(bins)), second_pass=True) if bins else None


def impostor_order_statistic(target: FarTarget, merged: VerificationPartial) -> float:
    """The (m+1)-th largest impostor score (-inf when every impostor may be accepted)."""
    k = target.allowed + 1
    if k > merged.impostors:
        return NEG_INF
    if not target.by_histogram:
        return float(merged.top[k - 1])
    high, rank = kth_largest_bin(merged.coarse, k)
    low, _ = kth_largest_bin(merged.fine[high], rank)
    return key_value(((high - BINS // 2) << 16) | low)


@dataclass
class VerificationResult:
    tar: dict[float, float]  # FAR target -> TAR (ours: largest TAR with FAR <= target)
    thresholds: dict[float, float]  # FAR target -> the impostor order statistic the threshold sits above
    genuine: int
    impostors: int
    roc: tuple[np.ndarray, np.ndarray]  # (FAR, TAR) at the measured targets and the genuine scores' own points


def finish_verification(targets: list[FarTarget], merged: VerificationPartial) -> VerificationResult:
    genuine = np.sort(np.concatenate(merged.genuine) if merged.genuine else np.zeros(0, np.float32))
    n_pos = max(len(genuine), 1)  # as roc_curve: no genuine pairs gives TAR 0, not a division by zero
    tar, thresholds = {}, {}
    for t in targets:
        v = impostor_order_statistic(t, merged)
        thresholds[t.far] = v
        tar[t.far] = float((len(genuine) - np.searchsorted(genuine, v, side="right")) / n_pos)
    points = sorted(tar.items())
    roc = (np.array([0.0] + [f for f, _ in points]), np.array([0.0] + [v for _, v in points]))
    return VerificationResult(tar, thresholds, len(genuine), merged.impostors, roc)


# -- identification --------------------------------------------------------------------------

@dataclass
class SearchPartial:
    """Per probe: the k largest non-mate scores (descending, -inf padded), their gallery
    indices (-1 for padding), and the best mate score (-inf when no mate was seen)."""
    top_scores: torch.Tensor
    top_index: torch.Tensor
    mate: torch.Tensor

    @staticmethod
    def empty(probes: int, k: int) -> "SearchPartial":
        return SearchPartial(torch.full((probes, k), NEG_INF), torch.full((probes, k), -1, dtype=torch.long),
                             torch.full((probes,), NEG_INF))

    def merge(self, other: "SearchPartial") -> "SearchPartial":
        k = self.top_scores.shape[1]
        scores = torch.cat([self.top_scores, other.top_scores.cpu()], dim=1)
        index = torch.cat([self.top_index, other.top_index.cpu()], dim=1)
        best = torch.topk(scores, k, dim=1)
        self.top_scores, self.top_index = best.values, torch.gather(index, 1, best.indices)
        self.mate = torch.maximum(self.mate, other.mate.cpu())
        return self


def search_block(probes: torch.Tensor, probe_labels, gallery: torch.Tensor, gallery_labels, k: int,
                 gallery_offset: int = 0, tile_elements: int = 1 << 22) -> SearchPartial:
    """Top-k non-mate scores per probe over this gallery block, and the best mate score.
    A mate is a gallery entry with the probe's (non-negative) label; mates are found from the
    labels (sparse), read, then masked to -inf before the top-k."""
    device = probes.device
    rows, cols = same_label_pairs(probe_labels, gallery_labels)
    out = SearchPartial.empty(len(probes), k)
    tile_rows = max(1, tile_elements // max(1, len(gallery)))
    take = min(k, len(gallery))
    for start in range(0, len(probes), tile_rows):
        stop = min(start + tile_rows, len(probes))
        scores = similarity(probes[start:stop], gallery)
        in_tile = (rows >= start) & (rows < stop)
        if in_tile.any():
            m_rows = torch.as_tensor(rows[in_tile] - start, device=device)
            m_cols = torch.as_tensor(cols[in_tile], device=device)
            best = torch.full((stop - start,), NEG_INF, device=device)
            best.scatter_reduce_(0, m_rows, scores[m_rows, m_cols], "amax")
            out.mate[start:stop] = best.cpu()
            scores[m_rows, m_cols] = NEG_INF
        if take:
            best = torch.topk(scores, take, dim=1)
            values, index = best.values.cpu(), best.indices.cpu() + gallery_offset
            out.top_scores[start:stop, :take] = values
            # a masked mate is no non-mate: padding, not a gallery index
            out.top_index[start:stop, :take] = torch.where(values == NEG_INF, -1, index)
    return out


def mate_ranks_within(mate_scores: np.ndarray, nonmate_top: np.ndarray, ranks) -> dict[int, np.ndarray]:
    """{r: mate found within rank r} per probe: the r-th best non-mate scores below the mate."""
    return {r: nonmate_top[:, r - 1] < mate_scores for r in ranks}


@dataclass
class OpenSetSearchResult:
    cmc: dict[int, float]
    tpir: dict[float, float]
    mated: int
    non_mated: int


def open_set_from_search(search: SearchPartial, mated: np.ndarray, ranks=(1, 5, 10), fpirs=(0.01, 0.1)
                         ) -> OpenSetSearchResult:
    """`metrics.open_set_identification` from merged search results: the same CMC (mate
    within rank r, ties against) and TPIR at FPIR (threshold: the smallest score that at
    most a share `fpir` of non-mated probes reach with their best gallery score)."""
    top = search.top_scores.numpy().astype(np.float64)
    mate = search.mate.numpy().astype(np.float64)
    mated = np.asarray(mated, bool)
    if top.shape[1] < max(ranks):
        raise ValueError(f"the search kept {top.shape[1]} non-mates per probe; rank {max(ranks)} needs as many")
    cmc = {}
    if mated.any():
        within = mate_ranks_within(mate[mated], top[mated], ranks)
        cmc = {r: float(v.mean()) for r, v in within.items()}
        top1 = mate_ranks_within(mate[mated], top[mated], (1,))[1]
    non = top[~mated, 0]  # a non-mated probe has no mate: its best non-mate is its best score
    tpir = {}
    for target in fpirs:
        if not mated.any() or len(non) == 0 or target < 1.0 / len(non):
            continue
        k = int(np.floor(target * len(non)))
        ordered = np.sort(non)[::-1]
        threshold = np.nextafter(ordered[k], np.inf) if k < len(ordered) else -np.inf
        tpir[float(target)] = float((top1 & (mate[mated] >= threshold)).mean())
    return OpenSetSearchResult(cmc, tpir, int(mated.sum()), int((~mated).sum()))


@dataclass
class MegaFaceRanks:
    cmc: dict[int, float]  # rank -> share of (probe, mate) trials whose mate is within that rank
    trials: int


def megaface_ranks(probes: torch.Tensor, probe_labels, distractor_top: torch.Tensor, ranks=(1,)) -> MegaFaceRanks:
    """MegaFace's rule (`metrics.identification_rank1`): for every ordered pair (probe p,
    mate g) of two images of one identity, the gallery is g plus the distractors; g is within
    rank r when fewer than r distractors score at least as high as g against p.
    `distractor_top`: each probe's largest distractor scores (descending, -inf padded)."""
    labels = np.asarray(probe_labels, np.int64)
    top = distractor_top.cpu().numpy()
    if top.shape[1] < max(ranks):
        raise ValueError(f"the search kept {top.shape[1]} distractors per probe; rank {max(ranks)} needs as many")
    hits = {r: 0 for r in ranks}
    trials = 0
    for ident in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == ident)
        if len(idx) < 2:
            continue
        sims = similarity(probes[idx], probes[idx]).cpu().numpy()  # row: probe, column: mate
        off_diagonal = ~np.eye(len(idx), dtype=bool)
        for r in ranks:
            hits[r] += int(((sims > top[idx, r - 1][:, None]) & off_diagonal).sum())
        trials += len(idx) * (len(idx) - 1)
    if trials == 0:
        raise ValueError("identification needs an identity with at least two probe images")
    return MegaFaceRanks({r: hits[r] / trials for r in ranks}, trials)

"""Margin-based softmax logits on cosine similarities (no I/O, no distributed state).

Each margin turns cosine logits `cos θ_j` into scaled logits: the target class gets a
margin-adjusted value, every other class keeps `s·cos θ_j`. They work on a *shard* of the
classes too: `target_index` is the target's column in this shard, or -1 where the row's
target class lives elsewhere (the model-parallel layer relies on this).

The combined form of the paper (Deng et al., eq. 4) is `s·(cos(m1·θ + m2) − m3)`:
ArcFace is (1, 0.5, 0), CosFace (1, 0, 0.35); SphereFace's multiplicative margin has its
own module because it needs the piecewise-monotonic ψ(θ) and the λ annealing.

Where θ + m passes π (ArcFace) the target logit `cos(θ + m)` would rise again as θ grows,
rewarding a sample for moving *away* from its centre. We use the handling of the
authors' released code: beyond θ = π − m the target logit is `cos θ − m·sin m`, which is
monotonically decreasing (see `CombinedMargin`).

All margin arithmetic runs in float32 even when the inputs come from bf16/fp16 autocast,
and never takes acos or sqrt at ±1 without clamping, so cos = ±1 gives finite gradients.

Inter-class filtering (arcface_torch's `interclass_filtering_threshold`, Partial FC paper
§3.3): a negative class whose cosine exceeds the threshold is most likely the sample's own
identity under another label (label noise). As arcface_torch does, its cosine is replaced by
0 before the margin: the logit becomes 0 (it still counts exp(0) in the softmax normaliser)
and it sends no gradient. The target column is never filtered; 0 turns filtering off.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_EPS = 1e-7


def _sin_from_cos(cos: torch.Tensor) -> torch.Tensor:
    # clamp keeps sqrt away from 0, where its derivative is infinite
    return torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))


def _safe_acos(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + _EPS, 1.0 - _EPS))


def interclass_filter_mask(cos: torch.Tensor, target_index: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Where a negative's cosine is above `threshold` (True = filtered), or None when
    filtering is off. `target_index` as in `MarginSoftmax.forward` (-1: target elsewhere,
    so every column of that row is a negative). No gradient flows through the mask."""
    if threshold <= 0:
        return None
    with torch.no_grad():
        dirty = cos > threshold
        column = target_index.clamp_min(0).unsqueeze(1)
        elsewhere = (target_index < 0).unsqueeze(1)
        # the target column keeps its value; rows whose target lives on another shard have none
        dirty.scatter_(1, column, dirty.gather(1, column) & elsewhere)
    return dirty


class MarginSoftmax(nn.Module):
    """Base: applies `target_cos` to the target column only, then scales by s."""

    def __init__(self, s: float = 64.0, straight_through: bool = False, interclass_filtering_threshold: float = 0.0):
        super().__init__()
        self.s = float(s)
        # The authors' arcface_torch computes the margin under no_grad, so its gradient is
        # d logit / d cos = s at the target (straight-through). Published models were trained
        # that way; the default here is the exact derivative of the formula.
        self.straight_through = straight_through
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise ValueError(f"interclass_filtering_threshold must be in [0, 1) (0: off), "
                             f"got {interclass_filtering_threshold}")
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)

    def target_cos(self, cos: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_step(self, step: int) -> None:
        """Per-step hook for margins with a schedule (SphereFace's lambda); the training
        loop calls it before every step."""

    def forward(self, cos: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        if cos.dtype != torch.float64:  # reduced precision in, float32 math (float64 kept for checks)
            cos = cos.float()
        dirty = interclass_filter_mask(cos, target_index, self.interclass_filtering_threshold)
        if dirty is not None:
            cos = cos.masked_fill(dirty, 0.0)  # filtered negatives: cos 0, no gradient
        valid = target_index >= 0
        index = target_index.clamp_min(0).unsqueeze(1)
        cos_t = cos.gather(1, index).squeeze(1)
        new_t = self.target_cos(cos_t)
        delta = torch.where(valid, new_t - cos_t, torch.zeros_like(cos_t))
        if self.straight_through:
            delta = delta.detach()
        # scatter_add instead of boolean indexing: no host synchronisation on GPU
        return cos.scatter_add(1, index, delta.unsqueeze(1)) * self.s


class CombinedMargin(MarginSoftmax):
    """`s·(cos(m1·θ + m2) − m3)` at the target; ArcFace, CosFace and mixes of them."""

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 straight_through: bool = False, interclass_filtering_threshold: float = 0.0):
        super().__init__(s, straight_through, interclass_filtering_threshold)
        if m1 < 1.0 or m2 < 0 or m3 < 0:
            raise ValueError("margins must make the target harder: m1 >= 1, m2 >= 0, m3 >= 0")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        # Beyond theta0 the angle m1·θ + m2 passes π and the curve would turn upwards.
        self.theta0 = (math.pi - self.m2) / self.m1

    def target_cos(self, cos: torch.Tensor) -> torch.Tensor:
        m1, m2, m3 = self.m1, self.m2, self.m3
        if m1 == 1.0:
            if m2 == 0.0:
                return cos - m3
            # cos(θ + m) = cos θ cos m − sin θ sin m, without acos: exact gradients near ±1
            margin = cos * math.cos(m2) - _sin_from_cos(cos) * math.sin(m2)
            # The released code's rule past θ = π − m: cos θ − m·sin m (monotone decreasing)
            beyond = cos < math.cos(self.theta0)
            return torch.where(beyond, cos - m2 * math.sin(m2), margin) - m3
        theta = _safe_acos(cos)
        margin = torch.cos(m1 * theta + m2)
        if self.theta0 >= math.pi:
            return margin - m3
        # General m1: continue past theta0 along cos θ shifted to meet the curve there
        # (continuous and decreasing, as the m1 = 1 rule is decreasing).
        shift = math.cos(self.theta0) - math.cos(m1 * self.theta0 + m2)
        return torch.where(theta > self.theta0, cos - shift, margin) - m3


class ArcFace(CombinedMargin):
    def __init__(self, s: float = 64.0, m: float = 0.5, straight_through: bool = False,
                 interclass_filtering_threshold: float = 0.0):
        super().__init__(s, 1.0, m, 0.0, straight_through, interclass_filtering_threshold)


class CosFace(CombinedMargin):
    def __init__(self, s: float = 64.0, m: float = 0.35, interclass_filtering_threshold: float = 0.0):
        super().__init__(s, 1.0, 0.0, m, interclass_filtering_threshold=interclass_filtering_threshold)


class SphereFace(MarginSoftmax):
    """Multiplicative angular margin `cos(m·θ)` on normalised features, with annealing.

    ψ(θ) = (−1)^k cos(mθ) − 2k for θ in [kπ/m, (k+1)π/m] keeps the target monotone in θ.
    SphereFace trains only with the softmax mix `(λ·cos θ + ψ(θ)) / (1 + λ)`, λ decaying as
    `max(lambda_min, lambda_base·(1 + gamma·step)^(−power))`; call `set_step` each step.
    """

    def __init__(self, s: float = 64.0, m: int = 4, lambda_base: float = 1000.0, lambda_min: float = 5.0,
                 gamma: float = 0.12, power: float = 1.0, interclass_filtering_threshold: float = 0.0):
        super().__init__(s, interclass_filtering_threshold=interclass_filtering_threshold)
        self.m = int(m)
        self.lambda_base, self.lambda_min, self.gamma, self.power = lambda_base, lambda_min, gamma, power
        self.lam = lambda_base

    def lambda_at(self, step: int) -> float:
        return max(self.lambda_min, self.lambda_base * (1.0 + self.gamma * step) ** (-self.power))

    def set_step(self, step: int) -> None:
        self.lam = self.lambda_at(step)

    def psi(self, cos: torch.Tensor) -> torch.Tensor:
        theta = _safe_acos(cos)
        with torch.no_grad():
            k = torch.floor(self.m * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * torch.cos(self.m * theta) - 2.0 * k

    def target_cos(self, cos: torch.Tensor) -> torch.Tensor:
        return (self.lam * cos + self.psi(cos)) / (1.0 + self.lam)


def subcentre_max(cos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-centre ArcFace: (B, C·K) cosines -> class cosine = max over its K sub-centres.

    Returns (class cosines (B, C), index of the nearest sub-centre per class (B, C)).
    """
    if k == 1:
        return cos, torch.zeros_like(cos, dtype=torch.long)
    b, ck = cos.shape
    if ck % k:
        raise ValueError(f"{ck} centres is not a multiple of K={k}")
    return cos.view(b, ck // k, k).max(dim=2)

"""Margins against direct float64 implementations of the paper's formulas."""

import math

import numpy as np
import pytest
import torch

from arcface_core.margins import ArcFace, CombinedMargin, CosFace, SphereFace, subcentre_max


def reference_combined(theta: np.ndarray, m1: float, m2: float, m3: float) -> np.ndarray:
    """cos(m1·θ + m2) − m3, and past θ0 = (π − m2)/m1 the documented monotone continuation."""
    theta0 = (math.pi - m2) / m1
    out = np.cos(m1 * theta + m2) - m3
    if theta0 < math.pi:
        if m1 == 1.0:  # the authors' code: cos θ − m·sin m
            beyond = np.cos(theta) - m2 * math.sin(m2) - m3
        else:
            beyond = np.cos(theta) - (math.cos(theta0) - math.cos(m1 * theta0 + m2)) - m3
        out = np.where(theta > theta0, beyond, out)
    return out


def reference_sphereface(theta: np.ndarray, m: int, lam: float) -> np.ndarray:
    k = np.floor(m * theta / math.pi)
    psi = (-1.0) ** k * np.cos(m * theta) - 2 * k
    return (lam * np.cos(theta) + psi) / (1 + lam)


def _run(margin, theta: np.ndarray, classes: int = 5):
    rng = np.random.default_rng(0)
    n = len(theta)
    cos = rng.uniform(-1, 1, (n, classes))
    target = rng.integers(0, classes, n)
    cos[np.arange(n), target] = np.cos(theta)
    cos_t = torch.tensor(cos, dtype=torch.float64, requires_grad=True)
    out = margin(cos_t, torch.tensor(target))
    return cos, target, out


ANGLES = np.linspace(0.0, math.pi, 2001)[1:-1]


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0),
                                        (1.2, 0.4, 0.1), (1.0, 1.2, 0.0)])
def test_combined_margin_matches_formula_including_beyond_pi(m1, m2, m3):
    s = 64.0
    margin = CombinedMargin(s, m1, m2, m3)
    cos, target, out = _run(margin, ANGLES)
    expected = cos * s
    expected[np.arange(len(ANGLES)), target] = s * reference_combined(ANGLES, m1, m2, m3)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-9)
    assert (ANGLES > margin.theta0).any() or margin.theta0 >= math.pi
    # The target logit never increases as the angle grows, also past π − m.
    values = reference_combined(ANGLES, m1, m2, m3)
    assert np.all(np.diff(values) <= 1e-12)


def test_arcface_and_cosface_are_the_paper_special_cases():
    theta = np.array([0.1, 1.0, 2.0, 2.9])
    _, target, arc = _run(ArcFace(s=30, m=0.5), theta)
    assert np.allclose(arc.detach().numpy()[np.arange(4), target], 30 * reference_combined(theta, 1, 0.5, 0))
    _, target, cf = _run(CosFace(s=30, m=0.35), theta)
    assert np.allclose(cf.detach().numpy()[np.arange(4), target], 30 * (np.cos(theta) - 0.35))


def test_sphereface_psi_and_annealing():
    sf = SphereFace(s=10, m=4)
    sf.set_step(0)
    assert sf.lam == 1000.0
    sf.set_step(10_000)
    assert sf.lam == 5.0  # floor reached
    sf.set_step(100)
    lam = max(5.0, 1000.0 / (1 + 0.12 * 100))
    assert sf.lam == pytest.approx(lam)
    cos, target, out = _run(sf, ANGLES)
    got = out.detach().numpy()[np.arange(len(ANGLES)), target] / 10
    np.testing.assert_allclose(got, reference_sphereface(ANGLES, 4, lam), atol=1e-9)
    assert np.all(np.diff(reference_sphereface(ANGLES, 4, 0.0)) <= 1e-12)  # ψ is monotone


@pytest.mark.parametrize("margin", [ArcFace(s=4.0), CosFace(s=4.0), CombinedMargin(4.0, 1.2, 0.3, 0.1), SphereFace(4.0)],
                         ids=["arcface", "cosface", "combined", "sphereface"])
def test_gradcheck_away_from_kinks(margin):
    theta = torch.tensor([0.3, 0.9, 1.4, 2.0], dtype=torch.float64)
    cos = torch.rand(4, 3, dtype=torch.float64) * 1.6 - 0.8
    target = torch.tensor([0, 2, 1, 0])
    cos[torch.arange(4), target] = torch.cos(theta)
    cos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: margin(c, target), (cos,))


def test_rows_whose_target_is_elsewhere_are_untouched():
    cos = torch.rand(3, 4, dtype=torch.float64)
    out = ArcFace(s=2.0)(cos, torch.tensor([-1, 1, -1]))
    assert torch.equal(out[0], cos[0] * 2) and torch.equal(out[2], cos[2] * 2)
    assert out[1, 1] != cos[1, 1] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", [ArcFace(), CosFace(), CombinedMargin(64, 1.3, 0.2, 0.1), SphereFace()],
                         ids=["arcface", "cosface", "combined", "sphereface"])
def test_no_nan_at_plus_minus_one(margin, dtype):
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [1.0, 1.0, -1.0]], dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = margin(cos, target)
    assert out.dtype == torch.float32
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


def test_straight_through_gradient_is_s_at_target():
    cos = torch.tensor([[0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    out = ArcFace(s=64.0, straight_through=True)(cos, torch.tensor([0]))
    out[0, 0].backward()
    assert cos.grad[0, 0].item() == pytest.approx(64.0)
    exact = torch.tensor([[0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    ArcFace(s=64.0)(exact, torch.tensor([0]))[0, 0].backward()
    # d/dcos cos(θ + m) = cos m + sin m · cos θ / sin θ
    t = math.acos(0.3)
    assert exact.grad[0, 0].item() == pytest.approx(64 * (math.cos(0.5) + math.sin(0.5) * 0.3 / math.sin(t)))
    assert out[0, 0].item() == pytest.approx(64 * math.cos(t + 0.5))


def test_subcentre_max_and_nearest():
    cos = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.0, -0.5]])
    values, nearest = subcentre_max(cos, 3)
    assert values.tolist() == [[pytest.approx(0.9), pytest.approx(0.3)]]
    assert nearest.tolist() == [[1, 0]]


def arcface_torch_combined_margin_loss(logits, labels, s, m1, m2, m3, threshold):
    """insightface arcface_torch's `CombinedMarginLoss.forward` (losses.py), transcribed line
    by line (labels as its PartialFC passes them: (B, 1), -1 = class elsewhere), then torch's
    cross entropy. Its ArcFace path runs under no_grad; its m3 path has exact gradients."""
    index_positive = torch.where(labels != -1)[0]
    if threshold > 0:
        with torch.no_grad():
            dirty = (logits > threshold).to(logits.dtype)
            mask = torch.ones([index_positive.size(0), logits.size(1)], dtype=logits.dtype)
            mask.scatter_(1, labels[index_positive], 0)
            dirty[index_positive] *= mask
            tensor_mul = 1 - dirty
        logits = tensor_mul * logits
    target_logit = logits[index_positive, labels[index_positive].view(-1)]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target_logit.arccos_()
            logits.arccos_()
            final_target_logit = target_logit + m2
            logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
            logits.cos_()
        logits = logits * s
    else:
        final_target_logit = target_logit - m3
        logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
        logits = logits * s
    return torch.nn.functional.cross_entropy(logits, labels.view(-1))


@pytest.mark.parametrize("ours, theirs", [
    (ArcFace(64.0, 0.5, straight_through=True, interclass_filtering_threshold=0.4), (1.0, 0.5, 0.0)),
    (CosFace(64.0, 0.4, interclass_filtering_threshold=0.4), (1.0, 0.0, 0.4)),
    (CosFace(30.0, 0.35, interclass_filtering_threshold=0.2), (1.0, 0.0, 0.35)),
], ids=["arcface-0.4", "cosface-0.4", "cosface-0.2"])
def test_interclass_filtering_equals_arcface_torch(ours, theirs):
    """Loss and gradient against arcface_torch's formula, with negatives above the threshold
    (some filtered, the target above it too: never filtered) in float64."""
    g = torch.Generator().manual_seed(5)
    cos = torch.rand(16, 40, generator=g, dtype=torch.float64) * 1.6 - 0.8  # theta + m < pi
    labels = torch.randint(0, 40, (16,), generator=g)
    cos[0, labels[0]] = 0.9  # a target above the threshold
    threshold = ours.interclass_filtering_threshold
    negatives = torch.ones_like(cos, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), False)
    assert (cos[negatives] > threshold).sum() > 20  # filtering has work to do

    ours_in = cos.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(ours(ours_in, labels), labels)
    loss.backward()
    theirs_in = cos.clone().requires_grad_(True)
    ref = arcface_torch_combined_margin_loss(theirs_in * 1.0, labels.unsqueeze(1), ours.s, *theirs,
                                             threshold)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-12, rtol=1e-10)
    # filtered negatives take no gradient; unfiltered ones do
    filtered = negatives & (cos > threshold)
    assert ours_in.grad[filtered].abs().max() == 0
    assert (ours_in.grad[negatives & ~filtered] != 0).all()
    # and it changes the loss: without filtering it is larger (those negatives counted at their cosine)
    plain = type(ours)(ours.s, ours.m2 if isinstance(ours, ArcFace) else ours.m3)
    assert torch.nn.functional.cross_entropy(plain(cos, labels), labels) > loss


def test_interclass_filtering_rows_whose_target_is_elsewhere_filter_every_column():
    cos = torch.tensor([[0.5, 0.1, 0.45], [0.5, 0.1, 0.45]], dtype=torch.float64)
    out = CosFace(10.0, 0.4, interclass_filtering_threshold=0.4)(cos, torch.tensor([-1, 0]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("threshold", [-0.1, 1.0])
def test_interclass_filtering_threshold_range(threshold):
    with pytest.raises(ValueError, match=r"interclass_filtering_threshold must be in \[0, 1\)"):
        ArcFace(interclass_filtering_threshold=threshold)

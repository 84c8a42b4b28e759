"""Config -> margin: each margin built from its own section with its own paper defaults."""

import math

import pytest
import torch

from arcface_core.margins import ArcFace, CombinedMargin, CosFace, SphereFace
from pipelines.config import ConfigError, load_config
from pipelines.training.config import MarginConfig
from pipelines.training.step import build_margin


def test_defaults_are_each_papers_own(tmp_path):
    """Switching `type` never carries one margin's m into another (the old bug: CosFace got
    ArcFace's 0.5 and SphereFace int(0.5) = 0, i.e. no margin)."""
    built = {kind: build_margin(MarginConfig(type=kind)) for kind in ("arcface", "cosface", "sphereface", "combined")}
    assert isinstance(built["arcface"], ArcFace) and built["arcface"].m2 == 0.5 and built["arcface"].m3 == 0.0
    assert isinstance(built["cosface"], CosFace) and built["cosface"].m3 == 0.35 and built["cosface"].m2 == 0.0
    assert isinstance(built["sphereface"], SphereFace) and built["sphereface"].m == 4
    assert (built["combined"].m1, built["combined"].m2, built["combined"].m3) == (1.0, 0.3, 0.2)
    assert all(m.s == 64.0 for m in built.values())


def test_every_margin_from_a_config_file(tmp_path):
    path = tmp_path / "margins.toml"
    path.write_text("""
[margin]
type = "arcface"
scale = 30.0
straight_through = true
[margin.arcface]
m = 0.45
[margin.cosface]
m = 0.4
[margin.sphereface]
m = 3
lambda_base = 500.0
lambda_min = 2.0
gamma = 0.5
power = 2.0
[margin.combined]
m1 = 1.1
m2 = 0.2
m3 = 0.1
""")
    cfg = load_config(path)
    arc = build_margin(cfg.margin)
    assert isinstance(arc, ArcFace) and arc.m2 == 0.45 and arc.s == 30.0 and arc.straight_through
    cfg.margin.type = "cosface"
    cos = build_margin(cfg.margin)
    assert isinstance(cos, CosFace) and cos.m3 == 0.4 and cos.s == 30.0
    cfg.margin.type = "sphereface"
    sphere = build_margin(cfg.margin)
    assert isinstance(sphere, SphereFace) and sphere.m == 3
    assert (sphere.lambda_base, sphere.lambda_min, sphere.gamma, sphere.power) == (500.0, 2.0, 0.5, 2.0)
    cfg.margin.type = "combined"
    comb = build_margin(cfg.margin)
    assert type(comb) is CombinedMargin and (comb.m1, comb.m2, comb.m3) == (1.1, 0.2, 0.1) and comb.straight_through
    # --set reaches nested sections, and the target logit is the formula with these values.
    cfg = load_config(path, ["margin.type=cosface", "margin.cosface.m=0.25"])
    cos = build_margin(cfg.margin)
    logits = cos(torch.tensor([[0.8, 0.1]]), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(30.0 * (0.8 - 0.25))
    assert logits[0, 1].item() == pytest.approx(30.0 * 0.1)


def test_sphereface_lambda_follows_the_schedule():
    sphere = build_margin(MarginConfig(type="sphereface"))
    sphere.set_step(0)
    assert sphere.lam == 1000.0
    sphere.set_step(10)
    assert sphere.lam == pytest.approx(1000.0 / (1 + 0.12 * 10))
    sphere.set_step(10**6)
    assert sphere.lam == 5.0
    # Other margins take the per-step hook and ignore it.
    build_margin(MarginConfig(type="arcface")).set_step(5)


@pytest.mark.parametrize("override, message", [
    (["margin.type=arcfce"], "margin.type must be one of arcface, cosface, sphereface, combined, got 'arcfce'"),
    (["margin.arcface.m=3.2"], r"margin.arcface.m must be in \[0, pi\), got 3.2"),
    (["margin.cosface.m=2"], r"margin.cosface.m must be in \[0, 2\)"),
    (["margin.sphereface.m=11"], r"margin.sphereface.m must be in \[1, 10\]"),
    (["margin.combined.m1=0.5"], r"margin.combined.m1 must be in \[1, 10\]"),
    (["margin.arcface.x=1"], "unknown key 'margin.arcface.x'"),
    (["margin.sphereface.m=0.5"], "should be int"),
    (["margin.scale=nan"], "finite"),
    (["margin.arcface=0.5"], "is a section"),
])
def test_bad_margin_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_arcface_from_config_matches_the_formula():
    margin = build_margin(MarginConfig(type="arcface", scale=10.0))
    theta = torch.tensor([0.3, 1.2])
    logits = margin(torch.stack([torch.cos(theta), torch.zeros(2)], 1), torch.tensor([0, 0]))
    assert torch.allclose(logits[:, 0], 10.0 * torch.cos(theta + 0.5), atol=1e-5)
    assert math.isclose(margin.theta0, math.pi - 0.5)

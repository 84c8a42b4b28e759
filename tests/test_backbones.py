"""Backbones: published sizes and FLOPs, shapes, and insightface-compatible parameter names."""

import pytest
import torch

from arcface_core.backbones import build_backbone, count_macs, count_parameters


@pytest.mark.parametrize("name, gflops, mparams", [("iresnet50", 6.3, 43.6), ("iresnet100", 12.1, 65.2),
                                                   ("mobilefacenet", 0.45, 2.0)])
def test_published_flops_and_parameters(name, gflops, mparams):
    model = build_backbone(name)
    assert count_macs(model) / 1e9 == pytest.approx(gflops, rel=0.05)
    assert count_parameters(model) / 1e6 == pytest.approx(mparams, rel=0.05)


def test_insightface_state_dict_layout():
    sd = build_backbone("iresnet50").state_dict()
    # names and shapes as in arcface_torch's iresnet50 checkpoints
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert sd["layer3.13.conv2.weight"].shape == (256, 256, 3, 3)
    assert sd["layer4.0.prelu.weight"].shape == (512,)
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    assert sd["features.running_var"].shape == (512,)
    assert "layer3.14.conv1.weight" not in sd


@pytest.mark.parametrize("name", ["tiny", "iresnet18", "mobilefacenet"])
def test_forward_shapes(name):
    model = build_backbone(name, num_features=128).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128) and torch.isfinite(out).all()

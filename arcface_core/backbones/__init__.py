"""Backbones: aligned 112x112 RGB faces in, `num_features`-d embeddings out."""

from __future__ import annotations

import torch
from torch import nn

from arcface_core.backbones.iresnet import LAYERS, IResNet
from arcface_core.backbones.mobilefacenet import MobileFaceNet

NAMES = (*LAYERS, "mobilefacenet", "tiny", "tiny-s2")


def build_backbone(name: str, num_features: int = 512, dropout: float = 0.0) -> nn.Module:
    name = name.lower()
    if name in LAYERS:
        return IResNet(LAYERS[name], num_features=num_features, dropout=dropout)
    if name == "mobilefacenet":
        return MobileFaceNet(num_features=num_features)
    if name == "tiny":
        # For tests and CPU demos: the IResNet design at 1/8 width, one block per stage.
        return IResNet((1, 1, 1, 1), num_features=num_features, dropout=dropout, widths=(8, 16, 32, 64))
    if name == "tiny-s2":
        # The demo's model on CPUs: "tiny" with a stride-2 stem, 4.9x the training throughput
        # (162 -> 792 img/s, batch 64, 2 threads): its 112x112 maps were ~60% of the step.
        return IResNet((1, 1, 1, 1), num_features=num_features, dropout=dropout, widths=(8, 16, 32, 64),
                       stem_stride=2)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 112) -> int:
    """Multiply-accumulates of one forward pass (convolutions and linear layers).

    Face-recognition papers and insightface's model zoo quote this figure as "GFLOPs".
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, _inp, out):
        nonlocal total
        total += mod.in_features * mod.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total

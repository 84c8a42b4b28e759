"""Backbones: aligned 112x112 RGB faces in, `num_features`-d embeddings out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from arcface_core.backbones.iresnet import LAYERS, IResNet
from arcface_core.backbones.mobilefacenet import MobileFaceNet
from arcface_core.backbones.vit import VisionTransformer


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how to build it, and where it comes from.

    `insightface` is the name arcface_torch's `backbones.get_model` gives the same network
    (same parameter names and shapes, so its released state dicts load); `zoo_gflops` is the
    figure arcface_torch's README model-zoo tables quote for it (its "GFLOPs" are
    multiply-accumulates, ptflops' convention), None where the README gives none.
    """

    name: str
    build: Callable[[int, float], nn.Module]  # (num_features, dropout) -> module
    insightface: str | None = None
    zoo_gflops: float | None = None
    about: str = ""


def _iresnet(layers, **kw):
    return lambda num_features, dropout: IResNet(layers, num_features=num_features, dropout=dropout, **kw)


def _vit(embed_dim: int, depth: int, drop_path_rate: float, mask_ratio: float, checkpointing: bool):
    # patch 9, 8 heads and LayerNorm throughout the family (arcface_torch's get_model);
    # dropout does not apply (the reference's ViTs take no dropout argument).
    return lambda num_features, dropout: VisionTransformer(
        num_features, img_size=112, patch_size=9, embed_dim=embed_dim, depth=depth, num_heads=8,
        drop_path_rate=drop_path_rate, mask_ratio=mask_ratio, activation_checkpointing=checkpointing)


_SPECS = [
    BackboneSpec("iresnet18", _iresnet(LAYERS["iresnet18"]), "r18", 2.6),
    BackboneSpec("iresnet34", _iresnet(LAYERS["iresnet34"]), "r34"),
    BackboneSpec("iresnet50", _iresnet(LAYERS["iresnet50"]), "r50", 6.3),
    BackboneSpec("iresnet100", _iresnet(LAYERS["iresnet100"]), "r100", 12.1),
    BackboneSpec("iresnet200", _iresnet(LAYERS["iresnet200"]), "r200", 23.5),
    BackboneSpec("iresnet2060", _iresnet(LAYERS["iresnet2060"], checkpoint_segments=(0, 20, 100, 0)), "r2060",
                 about="activations of stages 2-3 recomputed in training (as arcface_torch)"),
    BackboneSpec("mobilefacenet", lambda f, d: MobileFaceNet(num_features=f), "mbf", 0.45),
    BackboneSpec("mobilefacenet-large", lambda f, d: MobileFaceNet(num_features=f, blocks=(2, 8, 12, 4), scale=4),
                 "mbf_large"),
    # The ViT family under arcface_torch's own names. The _dp005_mask* variants (its
    # WebFace42M recipes) are the same networks with other training regularisers.
    BackboneSpec("vit_t", _vit(256, 12, 0.1, 0.1, False), "vit_t", 1.5),
    BackboneSpec("vit_t_dp005_mask0", _vit(256, 12, 0.05, 0.0, False), "vit_t_dp005_mask0", 1.5),
    BackboneSpec("vit_s", _vit(512, 12, 0.1, 0.1, False), "vit_s", 5.7),
    BackboneSpec("vit_s_dp005_mask_0", _vit(512, 12, 0.05, 0.0, False), "vit_s_dp005_mask_0", 5.7),
    BackboneSpec("vit_b", _vit(512, 24, 0.1, 0.1, True), "vit_b", 11.4),
    BackboneSpec("vit_b_dp005_mask_005", _vit(512, 24, 0.05, 0.05, True), "vit_b_dp005_mask_005", 11.4),
    BackboneSpec("vit_l_dp005_mask_005", _vit(768, 24, 0.05, 0.05, True), "vit_l_dp005_mask_005", 25.3,
                 about="the model zoo's ViT-L (arcface_torch's get_model has no plain vit_l)"),
    BackboneSpec("vit_h", _vit(1024, 48, 0.1, 0.0, True), "vit_h"),
    BackboneSpec("tiny", _iresnet((1, 1, 1, 1), widths=(8, 16, 32, 64)),
                 about="for tests and CPU demos: the IResNet design at 1/8 width, one block per stage"),
    # "tiny" with a stride-2 stem, 4.9x the training throughput on CPUs (162 -> 792 img/s,
    # batch 64, 2 threads): its 112x112 maps were ~60% of the step.
    BackboneSpec("tiny-s2", _iresnet((1, 1, 1, 1), widths=(8, 16, 32, 64), stem_stride=2),
                 about="the demo's model on CPUs: tiny with a stride-2 stem"),
]
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}
NAMES = tuple(BACKBONES)
# arcface_torch's names (r100, mbf, ...) are accepted too, for its users' configs.
INSIGHTFACE_NAMES = {spec.insightface: spec.name for spec in _SPECS if spec.insightface}


def backbone_spec(name: str) -> BackboneSpec:
    key = name.lower()
    key = INSIGHTFACE_NAMES.get(key, key)
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)} "
                         f"(or arcface_torch's {', '.join(n for n in INSIGHTFACE_NAMES if n not in BACKBONES)})")
    return BACKBONES[key]


def build_backbone(name: str, num_features: int = 512, dropout: float = 0.0) -> nn.Module:
    return backbone_spec(name).build(num_features, dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 112) -> int:
    """Multiply-accumulates of one forward pass of one face in eval mode: convolutions,
    linear layers and the attention products (normalisation and activations left out).

    Face-recognition papers and insightface's model zoo quote this figure as "GFLOPs".
    Counted from shapes (torch's FlopCounterMode, which reports 2 FLOPs per MAC), so a model
    built on the meta device is counted without computing anything.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2

# Test fixture: what arcface_torch's vit.py imports from timm (timm.models.layers), written
# out here so the tests need no timm; each follows timm's definition (Apache-2.0,
# https://github.com/huggingface/pytorch-image-models, timm/layers/drop.py and helpers.py).
import contextlib

import torch
from torch import nn


def autocast_noop(enabled=True):
    """Stands in for torch.cuda.amp.autocast(...): the tests compare float32 on CPU."""
    return contextlib.nullcontext()


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean, std, a, b)


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

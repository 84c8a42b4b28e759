"""Batch normalisation over the global batch, on any torch.distributed backend.

torch's SyncBatchNorm runs only on GPUs. This one also runs on CPU (gloo), so data-parallel
training on CPU workers normalises with the statistics of the whole global batch, exactly
as one process would on the same batch (and the tests can check that equivalence).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSumBackwardSum(torch.autograd.Function):
    """Sum over ranks; each rank's downstream differs, so gradients are summed too."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError("expected at least 2-D input")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 loses digits to
        # cancellation, and deep nets amplify that into visibly different gradients.
        sums = _AllReduceSumBackwardSum.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        var = _AllReduceSumBackwardSum.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            self.num_batches_tracked += 1
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d by GlobalBatchNorm, keeping parameters and buffers."""
    out = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        out.load_state_dict(module.state_dict())
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
    for name, child in module.named_children():
        out.add_module(name, convert_global_batchnorm(child))
    return out

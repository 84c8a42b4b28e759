"""The deployable embedding model: aligned 112x112 RGB uint8 faces in, embeddings out.

Training feeds the backbone float NCHW in [-1, 1]; serving receives images. This wrapper
puts the one preprocessing rule in the graph itself, so an exported program (see
pipelines/registry.py) needs nothing of this project to run.
"""

from __future__ import annotations

import torch


class AlignedFaceEmbedder(torch.nn.Module):
    """(N, 112, 112, 3) uint8 RGB -> (N, D) float32 embeddings (not normalised; callers
    add the mirror image's embedding for the flip test, then L2-normalise)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        dtype = next(self.backbone.parameters()).dtype
        # The same rule as the training data path: (x - 127.5) / 127.5; contiguous NCHW
        # because oneDNN kernels mishandle channels-last CPU input (see STACK-NOTES).
        x = faces.permute(0, 3, 1, 2).to(dtype).sub(127.5).div(127.5).contiguous()
        return self.backbone(x).float()


def embed_faces(model: torch.nn.Module, faces: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """L2-normalised embeddings of uint8 NHWC faces with `model` an AlignedFaceEmbedder (or
    an exported program of one); with `flip`, of the sum over each face and its mirror."""
    e = model(faces)
    if flip:
        e = e + model(torch.flip(faces, dims=[2]))
    return torch.nn.functional.normalize(e, dim=1)

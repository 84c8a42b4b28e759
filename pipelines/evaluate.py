"""Verification of an embedding model on insightface-format pair sets (`.bin`)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from arcface_core.metrics import kfold_accuracy, pair_scores, roc_curve, tar_at_far
from cleaning import storage
from cleaning.formats.insightface_bin import loads_pairs


def decode_aligned(blobs: list[bytes]) -> np.ndarray:
    """Encoded aligned faces -> (N, 3, 112, 112) float32 in [-1, 1]."""
    out = np.empty((len(blobs), 3, 112, 112), np.float32)
    for i, blob in enumerate(blobs):
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"pair image {i} does not decode")
        if img.shape[:2] != (112, 112):
            img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA)
        out[i] = (cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32).transpose(2, 0, 1) - 127.5) / 127.5
    return out


@torch.no_grad()
def embed(model: torch.nn.Module, faces: np.ndarray, device, batch: int = 128, flip: bool = True) -> np.ndarray:
    """Embeddings (not normalised); with `flip`, the sum over the face and its mirror image."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(faces), batch):
        x = torch.from_numpy(faces[i:i + batch]).to(device)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
        out.append(e.cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def load_pairs(uri: str) -> tuple[np.ndarray, np.ndarray]:
    images, issame = loads_pairs(storage.read_bytes(uri), name=uri)
    return decode_aligned(images), np.asarray(issame, bool)


def verify(model: torch.nn.Module, faces: np.ndarray, issame: np.ndarray, device, flip: bool = True) -> dict:
    emb = embed(model, faces, device, flip=flip)
    scores = pair_scores(emb[0::2], emb[1::2], "euclidean")
    folds = kfold_accuracy(scores, issame, nfolds=10)
    far, tar, _ = roc_curve(scores, issame)
    out = {"accuracy": folds.accuracy, "accuracy_std": folds.std, "threshold": folds.threshold}
    for target, value in tar_at_far(scores, issame).items():
        out[f"tar_at_far_{target:g}"] = value
    out["roc"] = (far, tar)
    return out

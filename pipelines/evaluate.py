"""`arcface evaluate`: verification and 1:N identification of an embedding model.

Evaluation sets:
  * insightface `.bin` pair sets (LFW, CFP-FP, AgeDB-30 and the demo's pairs are
    distributed this way), read with a restricted unpickler;
  * the held-out identities of a refined dataset (`arcface holdout` writes a pair set and
    `holdout_faces.parquet`; the parquet gives 1:N identification, MegaFace-style).
Each set is named `<file stem>-<first 8 hex of its SHA-256>`, so results recorded on
different models compare only when they were measured on the very same bytes.

An *embedder* is any callable (uint8 faces (N, 112, 112, 3), flip) -> L2-normalised
float32 embeddings: an in-process backbone (`TorchEmbedder`), a checkpoint or an MLflow
model (pipelines/registry.py `load_embedder`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from arcface_core.embedder import AlignedFaceEmbedder, embed_faces
from arcface_core.metrics import identification_rank1, kfold_accuracy, pair_scores, roc_curve, tar_at_far
from cleaning.formats.insightface_bin import loads_pairs
from dataset import shards, storage

log = logging.getLogger(__name__)


def decode_aligned(blobs: list[bytes]) -> np.ndarray:
    """Encoded aligned faces -> (N, 112, 112, 3) uint8 RGB."""
    out = np.empty((len(blobs), 112, 112, 3), np.uint8)
    for i, blob in enumerate(blobs):
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"image {i} does not decode")
        if img.shape[:2] != (112, 112):
            img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA)
        out[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return out


def set_name(uri: str, data: bytes) -> str:
    stem = storage.name(uri).rsplit(".", 1)[0]
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}"


@dataclass
class PairSet:
    name: str
    uri: str
    faces: np.ndarray  # (2P, 112, 112, 3) uint8, pair p = faces[2p], faces[2p+1]
    issame: np.ndarray


@dataclass
class FaceSet:
    name: str
    uri: str
    faces: np.ndarray
    identities: np.ndarray


def load_pairs(uri: str) -> PairSet:
    data = storage.read_bytes(uri)
    images, issame = loads_pairs(data, name=uri)
    return PairSet(set_name(uri, data), uri, decode_aligned(images), np.asarray(issame, bool))


def load_faces(uri: str) -> FaceSet:
    data = storage.read_bytes(uri)
    table = shards.read_table(uri, columns=["image", "identity"])
    return FaceSet(set_name(uri, data), uri, decode_aligned(table.column("image").to_pylist()),
                   np.asarray(table.column("identity").to_pylist()))


class TorchEmbedder:
    """An in-process backbone as an embedder."""

    def __init__(self, backbone: torch.nn.Module, device="cpu", batch: int = 128):
        self.model = AlignedFaceEmbedder(backbone)
        self.device, self.batch = torch.device(device), batch

    @torch.no_grad()
    def __call__(self, faces: np.ndarray, flip: bool = True) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            out = [embed_faces(self.model, torch.from_numpy(faces[i:i + self.batch]).to(self.device), flip).cpu()
                   for i in range(0, len(faces), self.batch)]
        finally:
            self.model.train(was_training)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def raw(self, faces: np.ndarray) -> np.ndarray:
        """Embedding of each face plus its mirror's, not normalised (IJB's norm weighting)."""
        self.model.eval()
        out = []
        for i in range(0, len(faces), self.batch):
            x = torch.from_numpy(faces[i:i + self.batch]).to(self.device)
            out.append((self.model(x) + self.model(torch.flip(x, dims=[2]))).float().cpu())
        return torch.cat(out).numpy()


def verify(embedder, pairs: PairSet, flip: bool = True) -> dict:
    """10-fold accuracy (insightface protocol), TAR@FAR where the pair count allows, ROC."""
    emb = embedder(pairs.faces, flip)
    scores = pair_scores(emb[0::2], emb[1::2], "euclidean")
    folds = kfold_accuracy(scores, pairs.issame, nfolds=10)
    far, tar, _ = roc_curve(scores, pairs.issame)
    out = {"accuracy": folds.accuracy, "accuracy_std": folds.std, "threshold": folds.threshold}
    for target, value in tar_at_far(scores, pairs.issame).items():
        out[f"tar_at_far_{target:g}"] = value
    out["roc"] = (far, tar)
    return out


def probe_identities(identities: np.ndarray) -> set:
    """A quarter of the identities (at least one), chosen by a hash of the name, are probes;
    the images of all others are the distractors."""
    people = sorted(set(identities.tolist()), key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    return set(people[: max(1, len(people) // 4)])


def identify(embedder, faces: FaceSet, flip: bool = True) -> dict:
    emb = embedder(faces.faces, flip)
    probes = np.isin(faces.identities, list(probe_identities(faces.identities)))
    result = identification_rank1(emb[probes], faces.identities[probes], emb[~probes])
    return {"rank1": result.rank1, "trials": result.probes, "distractors": result.distractors}


def evaluate(embedder, pair_uris: list[str] = (), face_uris: list[str] = (), flip: bool = True) -> dict[str, dict]:
    """{set name: metrics} over every given set."""
    results: dict[str, dict] = {}
    for uri in pair_uris:
        pairs = load_pairs(uri)
        results[pairs.name] = verify(embedder, pairs, flip)
        log.info("%s: accuracy %.4f ± %.4f", pairs.name, results[pairs.name]["accuracy"],
                 results[pairs.name]["accuracy_std"])
    for uri in face_uris:
        faces = load_faces(uri)
        results[faces.name] = identify(embedder, faces, flip)
        log.info("%s: rank-1 %.4f (%d trials, %d distractors)", faces.name, results[faces.name]["rank1"],
                 results[faces.name]["trials"], results[faces.name]["distractors"])
    return results


def load_sets(pair_uris: list[str], face_uris: list[str]) -> list:
    """Pair sets and identification sets, loaded once (training evaluates them repeatedly)."""
    return [load_pairs(u) for u in pair_uris] + [load_faces(u) for u in face_uris]


def evaluate_backbone(backbone: torch.nn.Module, sets: list, device) -> dict[str, dict]:
    """An in-training backbone on loaded sets (rank 0 of `arcface train`)."""
    embedder = TorchEmbedder(backbone, device)
    return {s.name: verify(embedder, s) if isinstance(s, PairSet) else identify(embedder, s) for s in sets}


def scalar_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Flat `<set>.<metric>` figures (the ROC left out), as MLflow metrics and version tags."""
    return {f"{name}.{k}": float(v) for name, m in results.items() for k, v in m.items() if k != "roc"}


def roc_png(results: dict[str, dict], title: str = "ROC") -> bytes | None:
    curves = {name: m["roc"] for name, m in results.items() if "roc" in m}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (far, tar) in curves.items():
        ax.plot(np.maximum(far, 1e-7), tar, label=name)
    ax.set_xscale("log")
    finest = min([float(far[far > 0].min()) for far, _ in curves.values() if (far > 0).any()] + [1e-4])
    ax.set_xlim(finest, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    from cleaning.report import figure_png

    png = figure_png(fig)
    plt.close(fig)
    return png


def dumps(results: dict[str, dict]) -> str:
    return json.dumps({n: {k: v for k, v in m.items() if k != "roc"} for n, m in results.items()}, indent=1)

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
model (pipelines/models.py `load_embedder`). `evaluate_model` (the command) embeds through
a *runner* of pipelines/eval_workers.py instead: in this process, or Ray actors that each load
the model once and read their share of the images from the sets' URIs (local or s3://);
the driver keeps the labels and the gathered embeddings, from which the metrics are
computed once, in the sets' order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from arcface_core.metrics import identification_rank1, kfold_accuracy, pair_scores, roc_curve, tar_at_far
from cleaning.formats.insightface_bin import loads_pairs
from dataset import bounded, shards, storage
from pipelines.eval_workers import CHUNK, as_runner
from pipelines.models import TorchEmbedder, pin_model_uri

log = logging.getLogger(__name__)


def decode_face(blob, index: int = 0, source: str = "") -> np.ndarray:
    """One encoded aligned face -> (112, 112, 3) uint8 RGB, through the project's bounded
    decoder (dataset/bounded.py: accepted formats and the pixel cap, read from the header
    before any pixel is decoded - a PNG bomb inside a pair set is refused, not inflated)."""
    img = bounded.decode_image(bytes(blob), f"{source}: image {index}" if source else f"image {index}")
    if img.shape[:2] != (112, 112):
        img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA)
    return img


def decode_aligned(blobs: list[bytes]) -> np.ndarray:
    """Encoded aligned faces -> (N, 112, 112, 3) uint8 RGB."""
    out = np.empty((len(blobs), 112, 112, 3), np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = decode_face(blob, i)
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


def read_set(uri: str) -> bytes:
    """An evaluation set's bytes: a regular file within the byte cap (dataset/bounded.py)."""
    return bounded.read_bounded(uri, bounded.MAX_EVAL_SET_BYTES, "evaluation set")


def load_pairs(uri: str) -> PairSet:
    data = read_set(uri)
    images, issame = loads_pairs(data, name=uri)
    return PairSet(set_name(uri, data), uri, decode_aligned(images), np.asarray(issame, bool))


def load_faces(uri: str) -> FaceSet:
    data = read_set(uri)
    table = shards.read_table(uri, columns=["image", "identity"])
    return FaceSet(set_name(uri, data), uri, decode_aligned(table.column("image").to_pylist()),
                   np.asarray(table.column("identity").to_pylist()))


def verify(embedder, pairs: PairSet, flip: bool = True) -> dict:
    """10-fold accuracy (insightface protocol), TAR@FAR where the pair count allows, ROC."""
    return verification_metrics(embedder(pairs.faces, flip), pairs.issame)


def verification_metrics(emb: np.ndarray, issame: np.ndarray) -> dict:
    """`verify`'s figures from the embeddings of the pairs' faces (pair p: rows 2p, 2p+1)."""
    scores = pair_scores(emb[0::2], emb[1::2], "euclidean")
    folds = kfold_accuracy(scores, issame, nfolds=10)
    far, tar, _ = roc_curve(scores, issame)
    out = {"accuracy": folds.accuracy, "accuracy_std": folds.std, "threshold": folds.threshold}
    for target, value in tar_at_far(scores, issame).items():
        out[f"tar_at_far_{target:g}"] = value
    out["roc"] = (far, tar)
    return out


def probe_identities(identities: np.ndarray) -> set:
    """A quarter of the identities (at least one), chosen by a hash of the name, are probes;
    the images of all others are the distractors."""
    people = sorted(set(identities.tolist()), key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    return set(people[: max(1, len(people) // 4)])


def identify(embedder, faces: FaceSet, flip: bool = True) -> dict:
    return identification_metrics(embedder(faces.faces, flip), faces.identities)


def identification_metrics(emb: np.ndarray, identities: np.ndarray) -> dict:
    """`identify`'s figures from the embeddings of the set's faces."""
    probes = np.isin(identities, list(probe_identities(identities)))
    result = identification_rank1(emb[probes], identities[probes], emb[~probes])
    return {"rank1": result.rank1, "trials": result.probes, "distractors": result.distractors}


# -- sets as their workers read them (pipelines/eval_workers.py) -----------------------------
# The driver knows a set by its name and labels; the faces stay where they are, and each job
# of at most `chunk` faces is read by the worker that embeds it.

@dataclass
class PairLabels:
    name: str
    uri: str
    issame: np.ndarray

    @property
    def count(self) -> int:
        return 2 * len(self.issame)


@dataclass
class FaceLabels:
    name: str
    uri: str
    identities: np.ndarray

    @property
    def count(self) -> int:
        return len(self.identities)


def read_pair_labels(uri: str) -> PairLabels:
    """A `.bin` pair set's name and same/different labels (run on a worker: it reads the file)."""
    data = read_set(uri)
    _, issame = loads_pairs(data, name=uri)
    return PairLabels(set_name(uri, data), uri, np.asarray(issame, bool))


def read_face_labels(uri: str) -> FaceLabels:
    """An identification set's name and identities, its images left unread."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_set(uri)
    identities = pq.read_table(pa.BufferReader(data), columns=["identity"]).column("identity").to_pylist()
    return FaceLabels(set_name(uri, data), uri, np.asarray(identities))


@dataclass
class BinImages:
    """Faces [start, stop) of a `.bin` pair set. The file is one pickle, so a worker unpacks it
    once (its cache keeps the last file) and decodes only this job's faces."""
    uri: str
    start: int
    stop: int
    flip: bool = True
    raw = False

    @property
    def count(self) -> int:
        return self.stop - self.start

    def open(self, cache: dict):
        images = cache.get(("bin", self.uri))
        if images is None:
            cache.clear()  # one file at a time: the jobs of a set come one after another
            images, _ = loads_pairs(read_set(self.uri), name=self.uri)
            cache[("bin", self.uri)] = images
        return lambda i: decode_face(images[self.start + i], self.start + i, self.uri)


@dataclass
class ParquetImages:
    """Rows [start, stop) of an identification set's `image` column: only the row groups
    that hold them are read."""
    uri: str
    start: int
    stop: int
    flip: bool = True
    raw = False

    @property
    def count(self) -> int:
        return self.stop - self.start

    def open(self, cache: dict):
        import pyarrow.parquet as pq

        with storage.open_input(self.uri) as fh:
            reader = pq.ParquetFile(fh)
            sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
            firsts = np.r_[0, np.cumsum(sizes)]
            groups = [g for g in range(len(sizes)) if firsts[g] < self.stop and firsts[g + 1] > self.start]
            table = reader.read_row_groups(groups, columns=["image"])
        offset = self.start - int(firsts[groups[0]]) if groups else 0
        images = table.column("image").slice(offset, self.count).to_pylist()
        return lambda i: decode_face(images[i], self.start + i, self.uri)


def chunks(count: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, count)) for start in range(0, count, chunk)]


def evaluate(embedder, pair_uris: list[str] = (), face_uris: list[str] = (), flip: bool = True,
             chunk: int = CHUNK) -> dict[str, dict]:
    """{set name: metrics} over every given set. `embedder` is a runner of
    pipelines/eval_workers.py (Ray workers or this process: `embedding_workers`) or a plain
    embedder, which then runs here. The faces of all sets are embedded in one stream of jobs;
    the metrics are computed from the gathered embeddings, set by set."""
    runner = as_runner(embedder)
    try:
        pair_sets = [runner.run(read_pair_labels, uri) for uri in pair_uris]
        face_sets = [runner.run(read_face_labels, uri) for uri in face_uris]
        jobs = [BinImages(s.uri, a, b, flip) for s in pair_sets for a, b in chunks(s.count, chunk)]
        jobs += [ParquetImages(s.uri, a, b, flip) for s in face_sets for a, b in chunks(s.count, chunk)]
        emb = runner.embed_jobs(jobs, "evaluation faces")
    finally:
        if runner is not embedder:  # made here for a plain embedder
            runner.close()
    results: dict[str, dict] = {}
    at = 0
    for labels in pair_sets + face_sets:
        own = emb[at:at + labels.count]
        at += labels.count
        if isinstance(labels, PairLabels):
            results[labels.name] = verification_metrics(own, labels.issame)
            log.info("%s: accuracy %.4f ± %.4f", labels.name, results[labels.name]["accuracy"],
                     results[labels.name]["accuracy_std"])
        else:
            results[labels.name] = identification_metrics(own, labels.identities)
            log.info("%s: rank-1 %.4f (%d trials, %d distractors)", labels.name, results[labels.name]["rank1"],
                     results[labels.name]["trials"], results[labels.name]["distractors"])
    return results


@dataclass
class Evaluation:
    results: dict[str, dict]  # set name -> metrics (with "roc")
    model_uri: str  # the model evaluated (an alias pinned to the version it named)
    ijb_name: str = ""  # the IJB set's entry in results, if one was evaluated


def evaluate_model(model_uri: str, pair_uris: list[str] = (), face_uris: list[str] = (), flip: bool = True,
                   ijb_root: str = "", ijb_target: str = "IJBC", ijb_norm: bool = False,
                   ijb_detector_score: bool = False, workers: int = 0, gpu: bool = False, ray_address: str = "",
                   chunk: int = CHUNK) -> Evaluation:
    """`arcface evaluate`: a model (checkpoint, MLflow model URI) on pair sets, identification
    sets and an IJB release, its faces embedded in this process (`workers=0`) or by `workers`
    Ray actors (one GPU each with `gpu`) that read the images themselves. An alias is pinned
    to its version first (`Evaluation.model_uri`: where the caller records the figures, see
    pipelines/registry.py `record_evaluation`)."""
    from pipelines.eval_workers import embedding_workers

    ijb_set = None
    if ijb_root:  # its protocol files are read (and checked) before any worker starts
        from pipelines import ijb

        ijb_set = ijb.load_ijb(ijb_root, ijb_target)
    model_uri = pin_model_uri(model_uri)
    with embedding_workers(model_uri, workers=workers, gpu=gpu, ray_address=ray_address) as runner:
        results = evaluate(runner, pair_uris, face_uris, flip, chunk) if (pair_uris or face_uris) else {}
        ijb_name = ""
        if ijb_set is not None:
            ijb_name = f"{ijb_set.target}-{ijb_set.digest}"
            results[ijb_name] = ijb.evaluate_ijb(ijb_set, ijb.embed_images(ijb_set, runner, chunk), norm=ijb_norm,
                                                 detector_score=ijb_detector_score)
    return Evaluation(results, model_uri, ijb_name)


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

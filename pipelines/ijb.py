"""IJB-B / IJB-C template-based evaluation (`arcface evaluate --ijb DIR --target IJBC`).

Reads the official release layout under DIR:

    meta/ijbc_face_tid_mid.txt          image name, template id, media id (one line per image)
    meta/ijbc_template_pair_label.txt   template 1, template 2, 1 (same subject) or 0
    meta/ijbc_name_5pts_score.txt       image name, 5 landmarks (x y x y ...), detector score
    loose_crop/<image name>             the loosely cropped photos and video frames
    (1:N, when present) meta/ijbc_1N_gallery_G1.csv, ..._G2.csv, ..._probe_mixed.csv
                                        TEMPLATE_ID, SUBJECT_ID, FILENAME columns

(IJB-B: the same with `ijbb_` names.) Each image is aligned with its five landmarks to the
ArcFace template and embedded with the flip test (the sum of the face's and its mirror's
embeddings, as insightface's IJB script does). Options of the protocol: `norm` keeps each
image feature's norm as its weight (otherwise features are L2-normalised), `detector_score`
multiplies each feature by its detector score. Features are pooled per media, then per
template (arcface_core.metrics.template_features); 1:1 verification scores every template
pair by cosine similarity; TAR is reported at FAR 1e-6 ... 1e-1 where the number of
impostor pairs supports it, in two read-outs of the same scores:
  tar_at_far_<F>              ours: the largest TAR at a threshold whose FAR is at most F
                              (what promotion gates use);
  insightface_tar_at_far_<F>  insightface's `eval_ijbc.py`: the TAR of the ROC point (scikit-
                              learn's curve) whose FAR is nearest F, which may lie above F; what
                              arcface_torch's model zoo and most papers report.
The images are embedded by pipelines/eval_workers.py's runners: in this process or on Ray
workers that read `loose_crop/` themselves.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from arcface_core.metrics import insightface_tar_at_far, open_set_identification, roc_curve, tar_at_far, \
    template_features, template_pair_scores
from cleaning.align import align_face
from dataset import storage
from pipelines.eval_workers import CHUNK, as_runner

log = logging.getLogger(__name__)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class IJBSet:
    target: str  # IJBB | IJBC
    root: str
    images: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray  # (N, 5, 2)
    scores: np.ndarray  # detector scores
    pairs: np.ndarray  # (P, 2) template ids
    labels: np.ndarray  # (P,) 1 same subject
    galleries: dict[str, dict[int, str]]  # G1/G2 -> template -> subject (1:N)
    probes: dict[int, str]
    digest: str  # of the protocol files: results compare only on the same protocol


def _lines(uri: str) -> list[list[str]]:
    return [line.split() for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _template_subjects(uri: str) -> dict[int, str]:
    rows = csv.DictReader(storage.read_bytes(uri).decode().splitlines())
    return {int(r["TEMPLATE_ID"]): r["SUBJECT_ID"] for r in rows}


def load_ijb(root: str, target: str) -> IJBSet:
    target = target.upper()
    if target not in ("IJBB", "IJBC"):
        raise ValueError(f"--target must be IJBB or IJBC, got {target!r}")
    prefix = target.lower()
    meta = storage.join(root, "meta")
    names = {kind: storage.join(meta, f"{prefix}_{kind}.txt") for kind in
             ("face_tid_mid", "template_pair_label", "name_5pts_score")}
    missing = [u for u in names.values() if not storage.exists(u)]
    if missing:
        raise FileNotFoundError(f"{root}: not an {target} release folder (missing {', '.join(missing)})")
    digest = hashlib.sha256(b"".join(storage.read_bytes(u) for u in names.values())).hexdigest()[:8]
    faces = _lines(names["face_tid_mid"])
    marks = {row[0]: row[1:] for row in _lines(names["name_5pts_score"])}
    images = [row[0] for row in faces]
    unknown = [i for i in images if i not in marks]
    if unknown:
        raise ValueError(f"{names['name_5pts_score']}: no landmarks for {len(unknown)} images (e.g. {unknown[0]})")
    landmarks = np.array([[float(v) for v in marks[i][:10]] for i in images], np.float32).reshape(-1, 5, 2)
    scores = np.array([float(marks[i][10]) if len(marks[i]) > 10 else 1.0 for i in images], np.float32)
    # 15.7M lines in IJB-C: parsed in one numpy pass, not as Python lists
    pair_rows = np.array(storage.read_bytes(names["template_pair_label"]).split(), dtype=np.int64).reshape(-1, 3)
    galleries, probes = {}, {}
    for g in ("G1", "G2"):
        uri = storage.join(meta, f"{prefix}_1N_gallery_{g}.csv")
        if storage.exists(uri):
            galleries[g] = _template_subjects(uri)
    probe_uri = storage.join(meta, f"{prefix}_1N_probe_mixed.csv")
    if galleries and storage.exists(probe_uri):
        probes = _template_subjects(probe_uri)
    return IJBSet(target, root, images, np.array([int(r[1]) for r in faces]), np.array([int(r[2]) for r in faces]),
                  landmarks, scores, pair_rows[:, :2], pair_rows[:, 2], galleries, probes, digest)


@dataclass
class IJBImages:
    """A job of pipelines/eval_workers.py: images of the release, read from `loose_crop/` by
    the worker, aligned with their landmarks; features are the flip test's sum, not normalised."""
    root: str
    names: list[str]
    landmarks: np.ndarray  # (n, 5, 2)
    raw = True
    flip = True

    @property
    def count(self) -> int:
        return len(self.names)

    def open(self, cache: dict):
        return self.aligned_face

    def aligned_face(self, i: int) -> np.ndarray:
        uri = storage.join(self.root, "loose_crop", self.names[i])
        img = cv2.imdecode(np.frombuffer(storage.read_bytes(uri), np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{uri}: not a decodable image")
        return align_face(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), self.landmarks[i])


def embed_images(ijb: IJBSet, embedder, chunk: int = CHUNK) -> np.ndarray:
    """Every image aligned with its landmarks and embedded with the flip test; not normalised.
    `embedder`: a runner of pipelines/eval_workers.py (Ray workers read the images themselves,
    `chunk` at a time) or a plain embedder with `.raw`, run in this process."""
    runner = as_runner(embedder)
    jobs = [IJBImages(ijb.root, ijb.images[start:start + chunk], ijb.landmarks[start:start + chunk])
            for start in range(0, len(ijb.images), chunk)]
    try:
        return runner.embed_jobs(jobs, f"{ijb.target} images")
    finally:
        if runner is not embedder:
            runner.close()


def evaluate_ijb(ijb: IJBSet, features: np.ndarray, norm: bool = False, detector_score: bool = False) -> dict:
    """Verification (and identification when the 1:N files are there) from image features."""
    feats = np.asarray(features, np.float64)
    if not norm:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if detector_score:
        feats = feats * ijb.scores[:, None]
    ids, tfeats = template_features(feats, ijb.templates, ijb.medias)
    scores = template_pair_scores(ids, tfeats, ijb.pairs)
    issame = ijb.labels.astype(bool)
    far, tar, _ = roc_curve(scores, issame)
    ours = tar_at_far(scores, issame, FARS)  # the targets the impostor pairs can measure
    out = {f"tar_at_far_{k:g}": v for k, v in ours.items()}
    # insightface's read-out (the ROC point nearest the target), at the same targets: what
    # published IJB tables report; promotion gates use ours
    out.update({f"insightface_tar_at_far_{k:g}": v for k, v in insightface_tar_at_far(scores, issame, ours).items()})
    out.update({"pairs": int(len(scores)), "impostor_pairs": int((~issame).sum()), "templates": int(len(ids)),
                "images": int(len(feats)), "roc": (far, tar)})
    if ijb.galleries and ijb.probes:
        index = {int(t): n for n, t in enumerate(ids)}
        p_ids = [t for t in ijb.probes if t in index]
        per = []
        for name, gallery in sorted(ijb.galleries.items()):
            g_ids = [t for t in gallery if t in index]
            if not g_ids or not p_ids:
                continue
            r = open_set_identification(tfeats[[index[t] for t in g_ids]], np.array([gallery[t] for t in g_ids]),
                                        tfeats[[index[t] for t in p_ids]], np.array([ijb.probes[t] for t in p_ids]))
            per.append(r)
            for k, v in r.cmc.items():
                out[f"{name}.rank{k}"] = v
            for f, v in r.tpir.items():
                out[f"{name}.tpir_at_fpir_{f:g}"] = v
        measured = [r for r in per if r.cmc]  # a gallery without mated probes has no CMC
        for k in (measured[0].cmc if measured else {}):
            out[f"rank{k}"] = float(np.mean([r.cmc[k] for r in measured]))
    return out


def table(name: str, results: dict) -> str:
    """Markdown: TAR at each FAR in both read-outs, then the 1:N figures."""
    rows = [f"| {k[len('tar_at_far_'):]} | {v:.4f} | {results.get('insightface_' + k, float('nan')):.4f} |"
            for k, v in results.items() if k.startswith("tar_at_far_")]
    ident = [f"| {k} | {v:.4f} |" for k, v in results.items() if "rank" in k or "tpir" in k]
    lines = [f"{name}: {results['templates']} templates, {results['pairs']} pairs "
             f"({results['impostor_pairs']} impostor)", "",
             "| FAR | TAR (ours: FAR <= target) | TAR (insightface: nearest ROC point) |", "|---|---:|---:|", *rows]
    if ident:
        lines += ["", "| metric | value |", "|---|---:|", *ident]
    return "\n".join(lines)

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

import numpy as np

from arcface_core.metrics import insightface_tar_at_far, open_set_identification, roc_curve, tar_at_far, \
    template_features, template_pair_scores
from cleaning.align import align_face
from dataset import bounded, storage
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


# The meta files are read whole (IJB-C's pair file is about 300 MB); this bounds them.
MAX_META_BYTES = bounded.MAX_EVAL_SET_BYTES


def _refuse(uri: str, line: int, rule: str):
    raise bounded.RefusedInput(f"{uri} line {line}: {rule}")


def _read_meta(uri: str) -> bytes:
    return bounded.read_bounded(uri, MAX_META_BYTES, "IJB meta file")


def _text(uri: str, data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise bounded.RefusedInput(f"{uri} line {line}: not UTF-8 text") from None


def _lines(uri: str, data: bytes) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line that is not blank."""
    return [(n, line.split()) for n, line in enumerate(_text(uri, data).splitlines(), 1) if line.strip()]


def _int(uri: str, line: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        _refuse(uri, line, f"{what} {value!r} is not an integer")


def _finite(uri: str, line: int, value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        _refuse(uri, line, f"{what} {value!r} is not a number")
    if not np.isfinite(number):
        _refuse(uri, line, f"{what} {value!r} is not a finite number")
    return number


def _faces(uri: str, data: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image names, template ids, media ids: three fields a line, each image once."""
    images, templates, medias, seen = [], [], [], {}
    for n, fields in _lines(uri, data):
        if len(fields) != 3:
            _refuse(uri, n, f"{len(fields)} fields; a line is: image name, template id, media id")
        name = fields[0]
        problem = bounded.name_problem(name)
        if problem:
            _refuse(uri, n, f"image name {name!r} is {problem}")
        if name in seen:
            _refuse(uri, n, f"image {name} is listed again (first on line {seen[name]}); each image once")
        seen[name] = n
        images.append(name)
        templates.append(_int(uri, n, fields[1], "template id"))
        medias.append(_int(uri, n, fields[2], "media id"))
    if not images:
        raise bounded.RefusedInput(f"{uri}: no image lines")
    return images, np.array(templates, np.int64), np.array(medias, np.int64)


def _landmarks(uri: str, data: bytes, images: list[str], faces_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Five landmarks and the detector score of each image: every line of the file has the
    image name, 10 coordinates and (in the official files) the score, all finite; a line one
    field short would shift every value after it, so all lines have the same number."""
    marks: dict[str, tuple[int, list[str]]] = {}
    width = None
    for n, fields in _lines(uri, data):
        if width is None:
            width = len(fields)
            if width not in (11, 12):
                _refuse(uri, n, f"{width} fields; a line is: image name, 10 landmark coordinates (x y of 5 "
                                "points), detector score")
        elif len(fields) != width:
            _refuse(uri, n, f"{len(fields)} fields where the file's first line has {width} (a missing or extra "
                            "value would shift the others)")
        if fields[0] in marks:
            _refuse(uri, n, f"image {fields[0]} is listed again (first on line {marks[fields[0]][0]}); each image once")
        marks[fields[0]] = (n, fields[1:])
    landmarks = np.empty((len(images), 10), np.float32)
    scores = np.ones(len(images), np.float32)
    for i, name in enumerate(images):
        if name not in marks:
            raise bounded.RefusedInput(f"{uri}: no landmarks for image {name} (of {faces_uri})")
        n, values = marks[name]
        landmarks[i] = [_finite(uri, n, v, "landmark coordinate") for v in values[:10]]
        if len(values) > 10:
            scores[i] = _finite(uri, n, values[10], "detector score")
            if scores[i] < 0:
                _refuse(uri, n, f"detector score {values[10]} is negative")
    return landmarks.reshape(-1, 5, 2), scores


def _pairs(uri: str, data: bytes, templates: np.ndarray, faces_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) template ids and (P,) labels. 15.7M lines in IJB-C: the values are parsed in one
    numpy pass; the per-line checks are vectorised, and only a refusal walks the lines."""
    fields = np.array([len(line.split()) for line in data.split(b"\n")], np.int32)  # the lines are not kept
    wrong = np.flatnonzero((fields != 0) & (fields != 3))
    if wrong.size:
        _refuse(uri, int(wrong[0]) + 1, f"{fields[wrong[0]]} fields; a line is: template 1, template 2, "
                                        "label (1 same subject, 0 not)")
    line_of = np.flatnonzero(fields == 3) + 1  # row -> line number
    if not line_of.size:
        raise bounded.RefusedInput(f"{uri}: no pair lines")
    try:
        rows = np.array(data.split(), dtype=np.int64).reshape(-1, 3)
    except (ValueError, OverflowError):
        for n, line in enumerate(data.split(b"\n"), 1):
            for value in line.split():
                try:
                    np.int64(int(value))
                except (ValueError, OverflowError):
                    _refuse(uri, n, f"{value.decode(errors='replace')!r} is not an integer (64-bit)")
        raise
    bad = np.flatnonzero((rows[:, 2] != 0) & (rows[:, 2] != 1))
    if bad.size:
        _refuse(uri, int(line_of[bad[0]]), f"label {rows[bad[0], 2]}; labels are 1 (same subject) or 0")
    known = np.isin(rows[:, :2], np.unique(templates))
    bad = np.flatnonzero(~known.all(axis=1))
    if bad.size:
        row = int(bad[0])
        template = rows[row, 0] if not known[row, 0] else rows[row, 1]
        _refuse(uri, int(line_of[row]), f"template {template} has no images in {faces_uri}; pairs must name "
                                        f"templates that exist ({bad.size} such lines)")
    return rows[:, :2], rows[:, 2]


def _template_subjects(uri: str, templates: np.ndarray, faces_uri: str) -> dict[int, str]:
    """A 1:N gallery or probe file: TEMPLATE_ID and SUBJECT_ID columns (one row per image or per
    template); every template exists and has one subject."""
    rows = csv.DictReader(_text(uri, _read_meta(uri)).splitlines())
    missing = [c for c in ("TEMPLATE_ID", "SUBJECT_ID") if c not in (rows.fieldnames or [])]
    if missing:
        raise bounded.RefusedInput(f"{uri} line 1: no {' or '.join(missing)} column (header {rows.fieldnames})")
    known = set(np.unique(templates).tolist())
    out: dict[int, str] = {}
    for row in rows:
        n = rows.line_num
        template, subject = row["TEMPLATE_ID"], row["SUBJECT_ID"]
        if template is None or subject is None or not subject.strip():
            _refuse(uri, n, "a row without its TEMPLATE_ID or SUBJECT_ID")
        template = _int(uri, n, template.strip(), "TEMPLATE_ID")
        if template not in known:
            _refuse(uri, n, f"template {template} has no images in {faces_uri}; 1:N templates must exist")
        if out.setdefault(template, subject.strip()) != subject.strip():
            _refuse(uri, n, f"template {template} has subject {subject.strip()!r} here and {out[template]!r} before")
    if not out:
        raise bounded.RefusedInput(f"{uri}: no rows")
    return out


def load_ijb(root: str, target: str) -> IJBSet:
    """The release's protocol, validated before anything is computed: every refusal names the
    file, the line and the rule."""
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
    data = {kind: _read_meta(uri) for kind, uri in names.items()}
    digest = hashlib.sha256(b"".join(data.values())).hexdigest()[:8]
    images, templates, medias = _faces(names["face_tid_mid"], data["face_tid_mid"])
    landmarks, scores = _landmarks(names["name_5pts_score"], data["name_5pts_score"], images, names["face_tid_mid"])
    pairs, labels = _pairs(names["template_pair_label"], data.pop("template_pair_label"), templates,
                           names["face_tid_mid"])
    galleries, probes = {}, {}
    for g in ("G1", "G2"):
        uri = storage.join(meta, f"{prefix}_1N_gallery_{g}.csv")
        if storage.exists(uri):
            galleries[g] = _template_subjects(uri, templates, names["face_tid_mid"])
    probe_uri = storage.join(meta, f"{prefix}_1N_probe_mixed.csv")
    if galleries and storage.exists(probe_uri):
        probes = _template_subjects(probe_uri, templates, names["face_tid_mid"])
    return IJBSet(target, root, images, templates, medias, landmarks, scores, pairs, labels, galleries, probes,
                  digest)


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
        # only regular files inside loose_crop/, within the byte and pixel caps
        folder = storage.join(self.root, "loose_crop")
        data = bounded.read_inside(folder, self.names[i])
        return align_face(bounded.decode_image(data, storage.join(folder, self.names[i])), self.landmarks[i])


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
    if feats.shape[0] != len(ijb.images):
        raise ValueError(f"{len(feats)} image features for the {len(ijb.images)} images of {ijb.root}")
    broken = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    if broken.size:
        raise ValueError(f"{ijb.root}: the model's feature of image {ijb.images[broken[0]]} is not finite "
                         f"({broken.size} images); no figures from it")
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

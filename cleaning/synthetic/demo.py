"""The demo raw dataset: rendered identities written in the real raw layouts, with defects.

It stands in for MS-Celeb-1M (TSV) and VGGFace2 (folders + CSV annotations), and for a
plain image folder, and injects the defects refinement must handle. Every injected defect
is listed in `ground_truth.json` beside the data, so tests can score refinement.

Deterministic: every image comes from its own random stream keyed by (seed, identity,
slot), so output bytes do not depend on worker count or order.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import os
import posixpath
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaning.align import align_face
from cleaning.formats import RAW_FORMATS, get_format, load
from cleaning.formats.insightface_bin import dumps_pairs
from cleaning.synthetic.demo_config import DemoConfig  # noqa: F401  (the section this generator reads)
from cleaning.synthetic.render import Identity, random_identity, render
from dataset.refined import EVAL, FACES_SUFFIX, SETS_BESIDE_DATA

log = logging.getLogger(__name__)


FORMATS = RAW_FORMATS  # the demo writes every registered format
MSCELEB_TSV = "FaceImageCroppedWithAlignment.tsv"

# Defects an image slot can carry (besides clean). Order fixes how the random draw maps.
SLOT_DEFECTS = ("label_noise", "exact_duplicate", "near_duplicate", "undecodable", "zero_byte",
                "no_face", "tiny_face", "blurred")


@dataclass
class DemoImage:
    identity: int  # filed under (index into the filed identities)
    slot: int
    true_identity: int | None  # None where no face is in the image
    defects: list[str]
    data: bytes
    landmarks: list[list[float]] | None = None
    box: list[float] | None = None
    source_slot: int | None = None  # for duplicates


@dataclass
class Plan:
    cfg: DemoConfig
    identities: list[Identity]  # filed identities (training + duplicate aliases)
    alias_of: dict[int, int] = field(default_factory=dict)  # alias identity -> original
    overlap: list[int] = field(default_factory=list)  # training identities also in the eval set
    eval_identities: list[Identity] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # image slots of each filed identity
    noise_from: dict[int, list[int]] = field(default_factory=dict)  # filed identity -> its noise sources


def appearance(ident: Identity) -> np.ndarray:
    """An identity's drawing parameters as one numeric vector (colours, shapes, flags)."""
    values: list[float] = []
    for v in vars(ident).values():
        if v is None:
            values += [0.0, 0.0, 0.0]  # no mole: presence 0, position 0
        elif isinstance(v, tuple):
            values += ([1.0] if len(v) == 2 else []) + [float(x) for x in v]
        else:
            values.append(float(v))
    return np.asarray(values)


def confusable_sources(ids: list[Identity], same_person: dict[int, set[int]], k: int) -> dict[int, list[int]]:
    """For each filed identity, the k others that look most like it (z-scored appearance
    parameters, Euclidean), never another filing of the same person."""
    x = np.stack([appearance(i) for i in ids])
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    out = {}
    for i in range(len(ids)):
        order = [int(j) for j in np.argsort(d[i], kind="stable") if int(j) not in same_person.get(i, {i})]
        out[i] = order[:k]
    return out


def make_plan(cfg: DemoConfig) -> Plan:
    n = cfg.identities
    if n < 2:
        raise ValueError("the demo needs at least 2 identities (label noise moves images between them)")
    ids = [random_identity(np.random.default_rng([cfg.seed, 1, i])) for i in range(n)]
    rng = np.random.default_rng([cfg.seed, 4])
    k = min(cfg.duplicate_identities, n // 2)
    originals = rng.choice(n, size=k, replace=False).tolist() if k else []
    alias_of = {n + j: int(orig) for j, orig in enumerate(originals)}
    ids += [ids[orig] for orig in originals]
    candidates = [i for i in range(n) if i not in originals]
    m = min(cfg.eval_overlap_identities, len(candidates))
    overlap = sorted(int(x) for x in rng.choice(candidates, size=m, replace=False)) if m else []
    evals = [random_identity(np.random.default_rng([cfg.seed, 2, e])) for e in range(cfg.eval_identities)]
    plan = Plan(cfg, ids, alias_of, overlap, evals)
    lo = cfg.images_per_identity_min or cfg.images_per_identity
    if not 1 <= lo <= cfg.images_per_identity:
        raise ValueError(f"images_per_identity_min ({lo}) must lie in [1, images_per_identity]")
    size_rng = np.random.default_rng([cfg.seed, 8])
    plan.sizes = [int(size_rng.integers(lo, cfg.images_per_identity + 1)) for _ in range(n)]
    plan.sizes += [plan.sizes[orig] for orig in originals]  # an alias is as large as its original
    if cfg.noise_sources:
        same = {i: {i, _partner(plan, i)} for i in range(len(ids))}
        plan.noise_from = confusable_sources(ids, same, cfg.noise_sources)
    return plan


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok
    return buf.tobytes()


def _partner(plan: Plan, i: int) -> int | None:
    if i in plan.alias_of:
        return plan.alias_of[i]
    for alias, orig in plan.alias_of.items():
        if orig == i:
            return alias
    return None


def render_identity(plan: Plan, i: int) -> list[DemoImage]:
    """All image slots of filed identity i. Slot 0 is always clean (duplicates copy it)."""
    cfg = plan.cfg
    thresholds = np.cumsum([getattr(cfg, d) for d in SLOT_DEFECTS])
    same_person = {i, _partner(plan, i)}
    out: list[DemoImage] = []
    for j in range(plan.sizes[i] if plan.sizes else cfg.images_per_identity):
        rng = np.random.default_rng([cfg.seed, 3, i, j])
        u = rng.random()
        defect = None if j == 0 else next((d for d, t in zip(SLOT_DEFECTS, thresholds) if u < t), None)
        if j == 1 and i < len(SLOT_DEFECTS) and getattr(cfg, SLOT_DEFECTS[i]) > 0:
            defect = SLOT_DEFECTS[i]  # every enabled defect occurs at least once, even in tiny sets
        who = i
        if defect == "label_noise":
            choices = plan.noise_from.get(i) or [x for x in range(len(plan.identities)) if x not in same_person]
            who = int(rng.choice(choices))
        # The alias shares its original's parameters, so its true identity is the original.
        true_id = plan.alias_of.get(who, who)
        if defect in ("exact_duplicate", "near_duplicate"):
            src = out[0]
            if defect == "exact_duplicate":
                out.append(DemoImage(i, j, src.true_identity, [defect], src.data, src.landmarks, src.box, 0))
                continue
            img = cv2.imdecode(np.frombuffer(src.data, np.uint8), cv2.IMREAD_COLOR)
            s, tx, ty = 1.0 + rng.uniform(0.01, 0.03), rng.uniform(-2, 2), rng.uniform(-2, 2)
            m = np.array([[s, 0, tx], [0, s, ty]])
            img = cv2.warpAffine(img, m, img.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
            img = cv2.convertScaleAbs(img, alpha=1.0, beta=float(rng.uniform(2, 6)))
            lm = (np.array(src.landmarks) * s + [tx, ty]).tolist()
            box = [src.box[0] * s + tx, src.box[1] * s + ty, src.box[2] * s, src.box[3] * s]
            out.append(DemoImage(i, j, src.true_identity, [defect], _jpeg(img, int(rng.integers(70, 90))), lm, box, 0))
            continue
        if defect in ("undecodable", "zero_byte"):
            if defect == "zero_byte":
                data = b""
            elif rng.random() < 0.5:  # a JPEG cut off after its header: no scan data at all
                data = _jpeg(render(plan.identities[who], rng, cfg.image_size).image, 90)[:120]
            else:  # not an image at all
                data = rng.bytes(int(rng.integers(200, 2000)))
            out.append(DemoImage(i, j, None, [defect], data))
            continue
        if defect == "no_face":
            r = render(None, rng, cfg.image_size)
            out.append(DemoImage(i, j, None, [defect], _jpeg(r.image, r.jpeg_quality)))
            continue
        eye_px = (8.0, 11.0) if defect == "tiny_face" else (26, 44)
        # Blurred enough to lose identity detail, not so much that no detector finds a face.
        blur = (2.5, 3.5) if defect == "blurred" else (0.0, 1.0)
        r = render(plan.identities[who], rng, cfg.image_size, eye_px=eye_px, blur=blur)
        out.append(DemoImage(i, j, true_id, [defect] if defect else [], _jpeg(r.image, r.jpeg_quality),
                             r.landmarks.round(2).tolist(), r.box.round(2).tolist()))
    return out


def _render_identity_task(args):
    plan, i = args
    return render_identity(plan, i)


# -- evaluation pair set ---------------------------------------------------------------

def build_eval_pairs(plan: Plan) -> tuple[bytes, dict]:
    """insightface-format pairs of aligned 112x112 faces: held-out identities plus the overlap ones."""
    cfg = plan.cfg
    people: list[tuple[str, Identity]] = [(f"eval_{e:04d}", ident) for e, ident in enumerate(plan.eval_identities)]
    people += [(f"train_{i}", plan.identities[i]) for i in plan.overlap]
    per_person = 6
    faces: list[list[bytes]] = []
    for p, (_, ident) in enumerate(people):
        row = []
        for k in range(per_person):
            r = render(ident, np.random.default_rng([cfg.seed, 5, p, k]), cfg.image_size)
            row.append(_jpeg(align_face(r.image, r.landmarks), 95))
        faces.append(row)
    rng = np.random.default_rng([cfg.seed, 6])
    images, issame, pair_people = [], [], []
    overlap_people = list(range(len(plan.eval_identities), len(people)))
    for n in range(cfg.eval_pairs):
        same = n % 2 == 0
        # Every overlap identity appears in at least one pair.
        a = overlap_people[n // 2] if same and n // 2 < len(overlap_people) else int(rng.integers(len(people)))
        if same:
            b = a
            ka, kb = rng.choice(per_person, size=2, replace=False)
        else:
            b = int(rng.choice([x for x in range(len(people)) if x != a]))
            ka, kb = rng.integers(per_person, size=2)
        images += [faces[a][ka], faces[b][kb]]
        issame.append(same)
        pair_people.append([people[a][0], people[b][0]])
    meta = {"pairs": len(issame), "positives": int(sum(issame)), "people": [p for p, _ in people],
            "pair_people": pair_people, "faces": [(people[p][0], face) for p, row in enumerate(faces) for face in row]}
    return dumps_pairs(images, issame), meta


# -- layouts ---------------------------------------------------------------------------
# One DemoLayout per raw format, named by the format's registry entry (cleaning/formats).

@dataclass(frozen=True)
class DemoLayout:
    """How the demo writes one raw format."""

    # (layout folder, plan, each filed identity's images, rng for row corruptions) ->
    # (ground-truth records, malformed rows)
    write: Callable[[Path, Plan, list[list[DemoImage]], np.random.Generator], tuple[list, list]]
    identity_name: Callable[[int], str]  # filed identity i's name, as the format's reader reports it
    input_folder: str = ""  # the folder inside the layout that a reader of the format takes


def demo_layout(fmt: str) -> DemoLayout:
    return load(get_format(fmt).demo)


def identity_name(fmt: str, i: int) -> str:
    return demo_layout(fmt).identity_name(i)


def _loose_box(box: list[float], size: int) -> list[float]:
    x, y, w, h = box
    x0, y0 = max(0.0, x - 0.15 * w), max(0.0, y - 0.15 * h)
    x1, y1 = min(float(size), x + 1.15 * w), min(float(size), y + 1.15 * h)
    return [round(x0), round(y0), round(x1 - x0), round(y1 - y0)]


def _record(fmt: str, img: DemoImage, key: str, path: str, line: int | None = None) -> dict:
    rec = {
        "key": key, "file": path, "filed_identity": identity_name(fmt, img.identity),
        "true_identity": None if img.true_identity is None else identity_name(fmt, img.true_identity),
        "defects": list(img.defects), "landmarks": img.landmarks, "box": img.box,
    }
    if line is not None:
        rec["line"] = line
    if img.source_slot is not None:
        rec["duplicate_of_slot"] = img.source_slot
    return rec


def _write_vggface2(out: Path, plan: Plan, images: list[list[DemoImage]], rng: np.random.Generator) -> tuple[list, list]:
    size = plan.cfg.image_size
    (out / "bb_landmark").mkdir(parents=True, exist_ok=True)
    records, malformed = [], []
    pending = list(VGG_ROW_DEFECTS)
    bb_rows = [["NAME_ID", "X", "Y", "W", "H"]]
    lm_rows = [["NAME_ID"] + [f"P{k}{a}" for k in range(1, 6) for a in "XY"]]
    meta_lines = ["Class_ID, Name, Sample_Num, Flag, Gender"]
    for i, slots in enumerate(images):
        name = identity_name("vggface2", i)
        (out / "train" / name).mkdir(parents=True, exist_ok=True)
        meta_lines.append(f'{name}, "Demo_Person_{i + 1}", {len(slots)}, 1, {"mf"[i % 2]}')
        for img in slots:
            key = f"{name}/{img.slot + 1:04d}_01"
            (out / "train" / f"{key}.jpg").write_bytes(img.data)
            rec = _record("vggface2", img, key, f"train/{key}.jpg")
            records.append(rec)
            if img.landmarks is None:
                continue  # no annotation: the raw set's own detector found nothing here
            bb = [str(v) for v in _loose_box(img.box, size)]
            lm = [f"{v:.2f}" for p in img.landmarks for v in p]
            # A few annotation rows are broken the ways real CSVs break (each kind at least once).
            kind = _corruption(rng, img, pending, VGG_ROW_DEFECTS)
            if kind == "non_numeric":
                bb[2] = "abc"
            elif kind == "missing_columns":
                lm = lm[:7]
            elif kind == "landmarks_outside_image":
                lm = [f"{float(v) + 3 * size:.2f}" for v in lm]
            if kind:
                rec["defects"].append("bad_annotation")
                target, rows = ("loose_bb_train.csv", bb_rows) if kind == "non_numeric" else ("loose_landmark_train.csv", lm_rows)
                malformed.append({"file": f"bb_landmark/{target}", "line": len(rows) + 1, "kind": kind, "key": key})
            bb_rows.append([key] + bb)
            lm_rows.append([key] + lm)
    # An annotation for an image that does not exist.
    ghost = f"{identity_name('vggface2', 0)}/9999_01"
    malformed.append({"file": "bb_landmark/loose_bb_train.csv", "line": len(bb_rows) + 1, "kind": "missing_image",
                      "key": ghost})
    bb_rows.append([ghost, "10", "10", "50", "60"])
    for fname, rows in (("bb_landmark/loose_bb_train.csv", bb_rows), ("bb_landmark/loose_landmark_train.csv", lm_rows)):
        with open(out / fname, "w", newline="") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
    (out / "identity_meta.csv").write_text("\n".join(meta_lines) + "\n")
    return records, malformed


VGGFACE2_LAYOUT = DemoLayout(_write_vggface2, lambda i: f"n{i + 1:06d}")


VGG_ROW_DEFECTS = ("non_numeric", "missing_columns", "landmarks_outside_image")
TSV_ROW_DEFECTS = ("missing_columns", "invalid_base64", "bad_face_rectangle", "unsafe_identity")
ROW_DEFECT_RATE = 0.01


def _corruption(rng: np.random.Generator, img: DemoImage, pending: list[str], kinds: tuple[str, ...]) -> str | None:
    """Which way (if any) to break this clean image's row: each kind once first, then ~1%."""
    u = rng.random()
    if img.defects:
        return None
    if pending and img.slot == 2:
        return pending.pop(0)
    if u < ROW_DEFECT_RATE:
        return kinds[int(u / ROW_DEFECT_RATE * len(kinds))]
    return None


def _face_rectangle(box: list[float] | None, size: int) -> str:
    x, y, w, h = box if box is not None else (0.0, 0.0, 0.0, 0.0)
    return base64.b64encode(struct.pack("<4f", x / size, y / size, w / size, h / size)).decode()


def _write_msceleb(out: Path, plan: Plan, images: list[list[DemoImage]], rng: np.random.Generator) -> tuple[list, list]:
    size = plan.cfg.image_size
    records, malformed = [], []
    pending = list(TSV_ROW_DEFECTS)
    lines: list[str] = []
    for i, slots in enumerate(images):
        mid = identity_name("msceleb-tsv", i)
        for img in slots:
            face_id = hashlib.sha1(f"{plan.cfg.seed}/{i}/{img.slot}".encode()).hexdigest()[:24]
            cols = [mid, str(img.slot + 1), f"http://images.example.invalid/{mid}/{img.slot}.jpg",
                    f"http://pages.example.invalid/{mid}/{img.slot}", face_id, _face_rectangle(img.box, size),
                    base64.b64encode(img.data).decode()]
            key = f"{mid}/{face_id}"
            rec = _record("msceleb-tsv", img, key, MSCELEB_TSV, line=len(lines) + 1)
            kind = _corruption(rng, img, pending, TSV_ROW_DEFECTS)
            if kind == "missing_columns":
                cols = cols[:5] + cols[6:]
            elif kind == "invalid_base64":
                cols[6] = "!!not-base64!!" + cols[6][:40]
            elif kind == "bad_face_rectangle":
                cols[5] = base64.b64encode(b"\x00\x01\x02").decode()
            elif kind == "unsafe_identity":
                cols[0] = f"../../{mid}"
                rec["key"] = key = f"{cols[0]}/{face_id}"  # the ground truth names what is in the file
            if kind:
                rec["defects"].append("malformed_row")
                malformed.append({"file": MSCELEB_TSV, "line": len(lines) + 1, "kind": kind, "key": key})
            records.append(rec)
            lines.append("\t".join(cols))
    (out / MSCELEB_TSV).write_text("\n".join(lines) + "\n")
    return records, malformed


MSCELEB_LAYOUT = DemoLayout(_write_msceleb, lambda i: f"m.0{i + 1:05x}")


IMAGE_FOLDER_ROOT = "images"  # the identity folders; ground truth and eval/ stay outside


def _write_image_folder(out: Path, plan: Plan, images: list[list[DemoImage]], rng: np.random.Generator) -> tuple[list, list]:
    records = []
    for i, slots in enumerate(images):
        name = identity_name("image-folder", i)
        (out / IMAGE_FOLDER_ROOT / name).mkdir(parents=True, exist_ok=True)
        for img in slots:
            key = f"{name}/{img.slot:04d}"
            (out / IMAGE_FOLDER_ROOT / f"{key}.jpg").write_bytes(img.data)
            records.append(_record("image-folder", img, key, f"{IMAGE_FOLDER_ROOT}/{key}.jpg"))
    return records, []


IMAGE_FOLDER_LAYOUT = DemoLayout(_write_image_folder, lambda i: f"person_{i + 1:05d}", IMAGE_FOLDER_ROOT)

REC_FOLDER = "faces_emore"  # as insightface distributes MS1MV2
PAIRS_FILE = "demo_pairs.bin"


def _write_insightface_rec(out: Path, plan: Plan, images: list[list[DemoImage]], rng: np.random.Generator) -> tuple[list, list]:
    """The layout of insightface's MS1M releases: faces already aligned to 112x112 (with the
    rendered landmarks, as the release was aligned with a detector's), JPEG 95, in
    train.rec/.idx with the header record, identity records and `property`, in the record
    order `demo.rec_order` names. A release holds no photo without an alignable face, so
    no-face and tiny-face slots are left out; damaged payloads (empty, not an image) stay, as
    transfer damage. Keys are the reader's: rec:<index>. The verification pair set goes beside
    train.rec, where insightface ships lfw.bin, cfp_fp.bin and agedb_30.bin."""
    from cleaning.formats.recordio import write_rec

    items, records = [], []
    for i, slots in enumerate(images):
        for img in slots:
            if img.defects and img.defects[0] in ("no_face", "tiny_face"):
                continue
            if img.landmarks is None:  # undecodable / zero-byte: the payload as it is
                payload = img.data
            else:
                photo = cv2.imdecode(np.frombuffer(img.data, np.uint8), cv2.IMREAD_COLOR)
                payload = _jpeg(align_face(photo, np.asarray(img.landmarks, np.float32)), 95)
            items.append((i, payload))
            records.append(_record("insightface-rec", img, f"rec:{len(items)}", f"{REC_FOLDER}/train.rec#{len(items)}"))
    (out / REC_FOLDER).mkdir(parents=True, exist_ok=True)
    write_rec(out / REC_FOLDER, items, order=plan.cfg.rec_order)
    return records, []


# The class label is the identity (as the reader reports it).
INSIGHTFACE_REC_LAYOUT = DemoLayout(_write_insightface_rec, str, REC_FOLDER)


def input_root(layout_root: str | os.PathLike, fmt: str) -> Path:
    """The folder a reader of `fmt` takes, inside one layout the demo wrote."""
    return Path(layout_root) / demo_layout(fmt).input_folder


def pairs_file(fmt: str) -> str:
    """Where a layout's pair set goes: in eval/ beside the raw data, or, for a layout that ships
    its evaluation sets inside the data folder (insightface's .bin files beside train.rec), there."""
    if fmt in SETS_BESIDE_DATA:
        return posixpath.join(demo_layout(fmt).input_folder, PAIRS_FILE)
    return f"{EVAL}/{PAIRS_FILE}"


def _no_progress(iterable, **_):
    return iterable


def generate(out_dir: str | os.PathLike, cfg: DemoConfig, formats: list[str], progress=_no_progress) -> dict:
    """Render the demo dataset once and write it in each requested layout.

    With one format the layout goes straight into `out_dir`; with several, into
    `out_dir/<format>/`. Each layout gets its own `ground_truth.json` and `eval/` pair set.
    `progress` wraps the rendering loop (a tqdm-like callable).
    """
    from cleaning.formats.recordio import ORDERS

    layouts = {fmt: demo_layout(fmt) for fmt in formats}  # (an unknown format: ValueError, before any work)
    if cfg.rec_order not in ORDERS:
        raise ValueError(f"demo.rec_order {cfg.rec_order!r}: choose from {', '.join(ORDERS)}")
    plan = make_plan(cfg)
    n_filed = len(plan.identities)
    tasks = [(plan, i) for i in range(n_filed)]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            images = list(progress(pool.map(_render_identity_task, tasks, chunksize=4), total=n_filed,
                                   desc="render identities"))
    else:
        images = [render_identity(plan, i) for i in progress(range(n_filed), desc="render identities")]
    pairs_bin, pairs_meta = build_eval_pairs(plan)
    summary = {}
    if cfg.ijb_subjects:
        from cleaning.synthetic.ijb import write_ijb

        ijb = write_ijb(Path(out_dir) / "ijb" / "IJBC", "IJBC", subjects=cfg.ijb_subjects, seed=cfg.seed)
        log.info("IJB-C-style set: %d templates of %d subjects in %s", ijb["templates"], ijb["subjects"], ijb["path"])
    for fmt in formats:
        out = Path(out_dir) / fmt if len(formats) > 1 else Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([cfg.seed, 7])  # same corruptions whichever formats run together
        records, malformed = layouts[fmt].write(out, plan, images, rng)
        # Evaluation sets beside the raw data, where RefinedDataset.eval_sets finds them; an
        # insightface training folder holds its pair sets itself.
        (out / EVAL).mkdir(exist_ok=True)
        pairs = pairs_file(fmt)
        (out / pairs).write_bytes(pairs_bin)
        overlap = [identity_name(fmt, i) for i in plan.overlap]

        def person(p: str) -> str:
            return identity_name(fmt, int(p[6:])) if p.startswith("train_") else p

        # The same faces for 1:N identification (an identification set: *_faces.parquet).
        faces_table = pa.table({"image": [f for _, f in pairs_meta["faces"]],
                                "identity": [person(p) for p, _ in pairs_meta["faces"]]})
        pq.write_table(faces_table, out / EVAL / f"demo{FACES_SUFFIX}", compression="zstd")
        pair_people = [[person(p) for p in pp] for pp in pairs_meta["pair_people"]]
        counts: dict[str, int] = {}
        for rec in records:
            for d in rec["defects"] or ["clean"]:
                counts[d] = counts.get(d, 0) + 1
        truth = {
            # `workers` changes speed, not bytes, so it stays out of the record.
            "format": fmt, "seed": cfg.seed, "config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
            "num_records": len(records), "defect_counts": dict(sorted(counts.items())),
            "duplicate_identities": [[identity_name(fmt, a), identity_name(fmt, o)] for a, o in plan.alias_of.items()],
            "eval_overlap_identities": overlap,
            "eval_faces": {"file": f"{EVAL}/demo{FACES_SUFFIX}", "faces": faces_table.num_rows},
            "eval_pairs": {"file": pairs, "pairs": pairs_meta["pairs"],
                           "positives": pairs_meta["positives"], "pair_identities": pair_people},
            "malformed_rows": malformed,
            "images": records,
        }
        (out / "ground_truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
        summary[fmt] = {"path": str(out), "records": len(records), "defects": truth["defect_counts"],
                        "malformed_rows": len(malformed)}
        log.info("%s: %d records in %s", fmt, len(records), out)
    return summary

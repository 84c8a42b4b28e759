"""Stage 1 on one partition: read -> steps -> staged kept table + rejects table + counts.

`process_partition` is what a Dask task runs. It is idempotent: its outputs have fixed
names and are written whole, the counts file last, so a task that dies half-way is simply
run again (by Dask's retry or a rerun of the job), and a finished one is skipped while its
fingerprint (records, input listing, config, code version) still matches.

Memory per task is bounded by the input, not by an identity's size: an identity's photos
are decoded in chunks under a pixel budget and detection runs on bounded copies.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from cleaning.config import CleanConfig
from cleaning.readers import Partition, input_stamp, read_partition
from cleaning.steps import Face, Step, StepChain, internal_error
from dataset import shards, storage
from dataset.refined import RefinedDataset

log = logging.getLogger(__name__)

MAX_REJECT_IMAGE_BYTES = 1 << 20
_DETECTOR = {}


@dataclass(frozen=True)
class PartitionSettings:
    """What a stage-1 task needs besides its steps: the [clean] settings, and a digest of
    them with the code version (the job makes it), part of every partition's fingerprint."""

    clean: CleanConfig
    config_digest: str


@dataclass
class PartitionCounts:
    """What stage 1 made of one partition. The worker writes it last (as JSON: its presence
    marks the partition done) and returns it; the driver sums them into the manifest."""

    partition: int
    read: int
    kept: int
    rejected: int  # read == kept + rejected
    reasons: dict[str, int]  # "stage/reason" -> records rejected for it
    steps: dict[str, dict]  # step name -> {"kept": n, "dropped": {reason: n}}
    worker: str  # the Dask worker that made it ("driver" for a partition rejected whole)
    fingerprint: str  # what made it (see `fingerprint`): a rerun reuses it only when equal
    peak_rss_mib: int = 0  # the worker process's peak resident memory when it finished

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "PartitionCounts | None":
        """None for a file this code did not write (an older layout): the partition is redone."""
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except TypeError:
            return None


def get_detector(min_face: int, device: str):
    """One MTCNN per worker process (weights load once)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (min_face, device)
    if key not in _DETECTOR:
        from cleaning.detect.mtcnn import MTCNN

        _DETECTOR[key] = MTCNN(device=device, min_face_size=min_face)
    return _DETECTOR[key]


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


class _Tables:
    def __init__(self, quality: int):
        self.kept: dict[str, list] = {f.name: [] for f in shards.STAGED_SCHEMA}
        self.rejects: dict[str, list] = {f.name: [] for f in shards.REJECT_SCHEMA}
        self.quality = quality

    def keep(self, face: Face) -> None:
        k = self.kept
        k["image"].append(face.encoded or _jpeg(face.aligned, self.quality))
        k["identity"].append(face.raw.identity)
        k["key"].append(face.raw.key)
        k["source"].append(face.raw.source)
        k["det_score"].append(face.det_score)
        k["landmarks"].append(None if face.landmarks is None else np.asarray(face.landmarks, np.float32).ravel().tolist())
        k["box"].append(None if face.box is None else np.asarray(face.box, np.float32).tolist())
        k["num_faces"].append(face.num_faces)
        k["face_choice"].append(face.face_choice or "aligned_source")
        k["eye_distance"].append(face.eye_distance)
        k["blur"].append(face.blur)
        k["dhash"].append(face.dhash.to_bytes(32, "big"))

    def reject(self, face: Face, stage: str, reason: str) -> None:
        r = self.rejects
        if face.encoded is not None:
            image = face.encoded
        elif face.aligned is not None:
            image = _jpeg(face.aligned, self.quality)
        elif face.raw.data and len(face.raw.data) <= MAX_REJECT_IMAGE_BYTES:
            image = face.raw.data
        else:
            image = None
        r["key"].append(face.raw.key)
        r["identity"].append(face.raw.identity)
        r["source"].append(face.raw.source)
        r["stage"].append(stage)
        r["reason"].append(reason)
        r["detail"].append(face.detail)
        r["image"].append(image)
        r["det_score"].append(face.det_score)
        r["eye_distance"].append(face.eye_distance)
        r["blur"].append(face.blur)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        return (pa.table(self.kept, schema=shards.STAGED_SCHEMA), pa.table(self.rejects, schema=shards.REJECT_SCHEMA))


def _run(steps: list[Step], face: Face) -> tuple[str, str] | None:
    for step in steps:
        reason = step(face)
        if reason is not None:
            return step.name, reason
    return None


def _by_identity(samples):
    """Group the reader's stream into runs of one identity (readers emit identities whole)."""
    group, current = [], None
    for s in samples:
        if group and s.identity != current:
            yield group
            group = []
        current = s.identity
        group.append(s)
    if group:
        yield group


def staged_uris(out: RefinedDataset, index: int) -> dict[str, str]:
    name = shards.part_name(index)
    return {"kept": out.staging(f"{name}.parquet"), "rejects": out.reject(f"{name}.parquet"),
            "counts": out.staging(f"{name}.json")}


def peak_rss_mib(pid: int | str = "self") -> int:
    """A process's (this one's by default) peak resident memory so far: VmHWM, not getrusage's
    ru_maxrss, which Linux carries across exec, so a process started by a large parent (a Dask
    nanny in a big driver, a benchmark that has just written its input) would report the
    parent's size. 0 for another process that is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) // 1024
    except (OSError, StopIteration):
        if pid != "self":
            return 0
        import resource  # not Linux

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _worker_name() -> str:
    """The Dask worker running this task (provenance: which machine made which shard)."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


def bounded_copy(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image scaled so that its longest side is at most `max_side`, and the scale."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def detect_bounded(detector, images: list[np.ndarray], max_side: int) -> list[list]:
    """Detections on bounded copies, boxes and landmarks in full-resolution pixels."""
    from cleaning.detect.mtcnn import Detection

    copies = [bounded_copy(img, max_side) for img in images]
    found = detector.detect([c for c, _ in copies])
    return [[Detection(d.box / scale, d.score, d.landmarks / scale) if scale != 1.0 else d for d in dets]
            for dets, (_, scale) in zip(found, copies)]


def _finish_chunk(chunk: list[Face], chain: StepChain, cfg: PartitionSettings, tables: "_Tables") -> None:
    """Detection where needed, then the steps after it, for one chunk of an identity."""
    need = [f for f in chunk if f.landmarks is None and f.aligned is None]
    failed: dict[int, tuple[str, str]] = {}  # id(face) -> (stage, reason): detection raised on it
    if need:
        detector = get_detector(cfg.clean.detector_min_face, cfg.clean.detector_device)
        try:
            found = detect_bounded(detector, [f.image for f in need], cfg.clean.detect_max_side)
        except Exception:  # one image broke the batch: detect one by one to find it
            found = []
            for face in need:
                try:
                    found += detect_bounded(detector, [face.image], cfg.clean.detect_max_side)
                except Exception as exc:
                    failed[id(face)] = ("detect", internal_error(face, "detection", exc))
                    found.append(None)
        for face, dets in zip(need, found):
            face.detections = dets
    for face in chunk:  # in the reader's (key) order: duplicates keep the first
        dropped = failed.get(id(face)) or _run(chain.after_detection, face)
        if not dropped:
            try:
                tables.keep(face)
            except Exception as exc:  # encoding the kept face
                dropped = ("write", internal_error(face, "writing the kept face", exc))
                face.aligned = face.encoded = None  # the reject keeps the source bytes instead
        if dropped:
            tables.reject(face, *dropped)
        face.image = None  # free the decoded photo early


def fingerprint(part: Partition, cfg: PartitionSettings) -> str:
    """What produced a partition's output: the partition (which records, from where), its
    input files' listing, the config and the code version."""
    spec = json.dumps(dataclasses.asdict(part), sort_keys=True, default=str)
    return hashlib.sha256(f"{spec}|{input_stamp(part)}|{cfg.config_digest}".encode()).hexdigest()


def process_partition(part: Partition, steps: StepChain, cfg: PartitionSettings,
                      out: RefinedDataset) -> PartitionCounts:
    uris = staged_uris(out, part.index)
    stamp = fingerprint(part, cfg)
    if storage.exists(uris["counts"]):  # finished on an earlier run: reused only if made from the same
        done = PartitionCounts.from_json(shards.read_json(uris["counts"]))
        if done is not None and done.fingerprint == stamp:
            return done
    chain = copy.deepcopy(steps)
    tables = _Tables(cfg.clean.jpeg_quality)
    read = 0
    for group in _by_identity(read_partition(part)):
        read += len(group)
        # Decoded photos are held in chunks under a pixel budget, never a whole identity:
        # every step still sees the identity's faces in the reader's (key) order.
        chunk: list[Face] = []
        pixels = 0
        for raw in group:
            face = Face(raw)
            if cfg.clean.redetect:
                raw.landmarks = None
            dropped = _run(chain.before_detection, face)
            if dropped:
                tables.reject(face, *dropped)
                face.image = None
                continue
            chunk.append(face)
            pixels += face.image.shape[0] * face.image.shape[1]
            if pixels >= cfg.clean.decoded_pixels_per_chunk or len(chunk) >= cfg.clean.detector_batch:
                _finish_chunk(chunk, chain, cfg, tables)
                chunk, pixels = [], 0
        _finish_chunk(chunk, chain, cfg, tables)
    kept, rejects = tables.tables()
    reasons = Counter(f"{stage}/{reason}" for stage, reason in zip(rejects.column("stage").to_pylist(),
                                                                    rejects.column("reason").to_pylist()))
    counts = PartitionCounts(partition=part.index, read=read, kept=kept.num_rows, rejected=rejects.num_rows,
                             reasons=dict(reasons.most_common()), steps={s.name: s.counts() for s in chain.all()},
                             worker=_worker_name(), fingerprint=stamp, peak_rss_mib=peak_rss_mib())
    if read != kept.num_rows + rejects.num_rows:  # an invariant, not an input problem
        raise RuntimeError(f"partition {part.index}: read {read} != kept {kept.num_rows} + rejected {rejects.num_rows}")
    shards.write_table(uris["kept"], kept, cfg.clean.row_group_rows)
    # Small row groups: a rejects file holds raw photos, and the report reads a few rows of it.
    shards.write_table(uris["rejects"], rejects, min(100, cfg.clean.row_group_rows))
    shards.write_json(uris["counts"], counts.to_json())  # last: marks the partition done
    return counts


def count_records(part: Partition) -> int:
    """Records of a partition, read but not decoded."""
    return sum(1 for _ in read_partition(part))


def reject_partition(part: Partition, cfg: PartitionSettings, out: RefinedDataset, stage: str, reason: str,
                     detail: str) -> PartitionCounts:
    """Stage a partition whose records are all rejected without being processed (the
    record a worker died on, once bisection has isolated it); its bytes are kept as any
    reject's are (capped)."""
    uris = staged_uris(out, part.index)
    tables = _Tables(cfg.clean.jpeg_quality)
    read = 0
    for raw in read_partition(part):
        read += 1
        face = Face(raw)
        face.detail = f"{raw.source}: {detail}"
        tables.reject(face, stage, reason)
    kept, rejects = tables.tables()
    counts = PartitionCounts(partition=part.index, read=read, kept=0, rejected=rejects.num_rows,
                             reasons={f"{stage}/{reason}": rejects.num_rows} if read else {}, steps={},
                             worker="driver", fingerprint=fingerprint(part, cfg))
    shards.write_table(uris["kept"], kept, cfg.clean.row_group_rows)
    shards.write_table(uris["rejects"], rejects, min(100, cfg.clean.row_group_rows))
    shards.write_json(uris["counts"], counts.to_json())
    return counts

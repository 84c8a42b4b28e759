"""Stage-1 refinement steps. Each is small: it looks at one face and keeps it or drops it
with a reason, and counts what it did (the datatrove filter pattern).

A `Face` carries one raw sample through the steps, gaining a decoded image, landmarks,
an aligned crop and quality figures on the way. A `StepChain` holds the steps in order
(those before detection, those after); cleaning/stage1.py runs each face through them, and
the first drop ends its journey in the rejects table with (stage, reason, detail).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np

from cleaning.align import ARCFACE_TEMPLATE, AlignmentError, align_face
from cleaning.readers import RawSample
from dataset import bounded

log = logging.getLogger(__name__)


@dataclass
class Face:
    raw: RawSample
    image: np.ndarray | None = None  # RGB uint8
    landmarks: np.ndarray | None = None  # (5, 2) source pixels
    box: np.ndarray | None = None  # x, y, w, h source pixels
    det_score: float = float("nan")  # NaN where landmarks came from the source
    num_faces: int = 0
    face_choice: str = ""
    aligned: np.ndarray | None = None  # RGB uint8 112x112
    eye_distance: float = float("nan")
    blur: float = float("nan")
    dhash: int = 0
    sha256: str = ""
    detail: str = ""  # why, for a drop (file, line, figure)
    detections: list | None = None  # MTCNN output for this image, set by the batch runner
    encoded: bytes | None = None  # bytes to store as they are (a pre-aligned 112x112 JPEG: no re-encoding)


INTERNAL_ERROR = "internal_error"


def internal_error(face: Face, where: str, exc: Exception) -> str:
    """A record on which our code (or a library's) raised: the reason it is rejected for,
    with the error in its detail and, with its traceback, in the worker's log. The job fails
    when many records do (clean.max_internal_error_share): that is a bug, not bad input."""
    face.detail = f"{face.raw.source}: {type(exc).__name__} in {where}: {str(exc)[:300]}"
    log.error("%s: %s raised on this record; it is rejected as %s", face.raw.key, where, INTERNAL_ERROR,
              exc_info=exc)
    return INTERNAL_ERROR


class Step:
    """Keep (return None) or drop (return a reason). Subclasses say which reasons they give;
    any of them may also drop a record it raised on (INTERNAL_ERROR)."""

    name = "step"
    reasons: tuple[str, ...] = ()

    def __init__(self):
        self.kept = 0
        self.dropped: Counter[str] = Counter()

    def check(self, face: Face) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, face: Face) -> str | None:
        try:
            reason = self.check(face)
        except Exception as exc:  # a record that trips an error here costs itself, not its partition
            reason = internal_error(face, self.name, exc)
        if reason is None:
            self.kept += 1
        else:
            self.dropped[reason] += 1
        return reason

    def counts(self) -> dict:
        return {"kept": self.kept, "dropped": dict(self.dropped)}


class RecordCheck(Step):
    """Drops records the reader already found broken (malformed rows, unsafe names...)."""

    name = "read"

    def check(self, face):
        if face.raw.reject:
            reason, face.detail = face.raw.reject
            return reason
        return None


class ExactDuplicate(Step):
    """Byte-identical files within an identity: keeps the first (in key order)."""

    name = "exact_duplicate"
    reasons = ("exact_duplicate",)

    def __init__(self):
        super().__init__()
        self.seen: dict[tuple[str, str], str] = {}

    def check(self, face):
        face.sha256 = hashlib.sha256(face.raw.data or b"").hexdigest()
        if not face.raw.data:
            return None  # empty files are the decoder's to reject
        first = self.seen.setdefault((face.raw.identity, face.sha256), face.raw.key)
        if first != face.raw.key:
            face.detail = f"same bytes as {first}"
            return "exact_duplicate"
        return None


# The project's image rules (accepted formats, header sniffing, pixel cap) live in
# dataset/bounded.py, shared with evaluation; imported here under their old names.
ACCEPTED_FORMATS = bounded.ACCEPTED_FORMATS
sniff_image = bounded.sniff_image


class Decode(Step):
    """Decodes to RGB uint8. Grey, RGBA, 16-bit and CMYK become 8-bit RGB; empty, truncated,
    non-image and over-large (pixel cap) files are dropped."""

    name = "decode"
    reasons = ("empty_file", "too_many_pixels", "unsupported_format", "undecodable", "truncated", "not_aligned_112")

    def __init__(self, max_pixels: int):
        super().__init__()
        self.max_pixels = max_pixels

    def check(self, face):
        data = face.raw.data
        problem = bounded.image_problem(data, self.max_pixels, face.raw.source)
        if problem:
            reason, face.detail = problem
            return reason
        img = bounded.decode_bgr(data)
        if img is None:
            face.detail = f"{face.raw.source}: not a decodable image"
            return "undecodable"
        face.image = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if face.raw.aligned:  # insightface-rec: already aligned faces, no detection
            return self._pre_aligned(face, data)
        if face.raw.box is not None and face.raw.box.max() <= 1.0 and face.raw.landmarks is None:
            h, w = face.image.shape[:2]  # MS-Celeb rectangles are relative
            face.box = face.raw.box * np.array([w, h, w, h], np.float32)
        elif face.raw.box is not None:
            face.box = face.raw.box
        return None


    @staticmethod
    def _pre_aligned(face: Face, data: bytes) -> str | None:
        """An aligned crop from the source. A 112x112 JPEG is kept byte for byte (re-encoding
        would only lose detail); other square crops are resized once; a crop that is not
        square is no aligned face. The landmarks recorded are the template's, marked as such
        by face_choice = "pre_aligned"."""
        h, w = face.image.shape[:2]
        if h != w:
            face.detail = f"{face.raw.source}: {w}x{h}, expected a square aligned crop (112x112)"
            return "not_aligned_112"
        if (h, w) != (112, 112):
            face.image = cv2.resize(face.image, (112, 112), interpolation=cv2.INTER_AREA if h > 112 else cv2.INTER_CUBIC)
        elif data[:2] == b"\xff\xd8":
            face.encoded = data
        face.aligned = face.image
        face.landmarks = ARCFACE_TEMPLATE.astype(np.float32).copy()
        face.box = np.array([0, 0, 112, 112], np.float32)
        face.num_faces, face.face_choice = 1, "pre_aligned"
        return None


class SourceLandmarks(Step):
    """Uses landmarks the source provides (VGGFace2), if they lie on the image."""

    name = "source_landmarks"
    reasons = ("landmarks_outside_image",)

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def check(self, face):
        lm = face.raw.landmarks
        if lm is None:
            return None
        h, w = face.image.shape[:2]
        pad = self.margin * max(h, w)
        if not (np.all(lm[:, 0] >= -pad) and np.all(lm[:, 0] <= w + pad) and np.all(lm[:, 1] >= -pad)
                and np.all(lm[:, 1] <= h + pad)):
            face.detail = f"{face.raw.source}: landmarks {lm.round(1).tolist()} outside {w}x{h}"
            return "landmarks_outside_image"
        face.landmarks = lm
        face.num_faces, face.face_choice = 1, "source_landmarks"
        return None


def choose_face(detections, image_shape, source_box=None):
    """The source's face if it gave a box (best overlap), else the largest central one.

    'Largest central' follows insightface's rule: area minus twice the squared distance of
    the box centre from the image centre.
    """
    if not detections:
        return None, ""
    if len(detections) == 1:
        return detections[0], "only"
    boxes = np.array([d.box for d in detections], np.float64)
    if source_box is not None:
        x, y, w, h = source_box
        sb = np.array([x, y, x + w, y + h])
        ix = np.clip(np.minimum(boxes[:, 2], sb[2]) - np.maximum(boxes[:, 0], sb[0]), 0, None)
        iy = np.clip(np.minimum(boxes[:, 3], sb[3]) - np.maximum(boxes[:, 1], sb[1]), 0, None)
        inter = ix * iy
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        iou = inter / (area + w * h - inter + 1e-9)
        if iou.max() > 0.3:
            return detections[int(iou.argmax())], "source_box"
    h, w = image_shape[:2]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 - w / 2, (boxes[:, 1] + boxes[:, 3]) / 2 - h / 2], 1)
    value = area - 2.0 * (centre ** 2).sum(1)
    return detections[int(value.argmax())], "largest_central"


class Detected(Step):
    """Applies a batch's detections: no face is a drop; several faces, a recorded choice."""

    name = "detect"
    reasons = ("no_face",)

    def check(self, face):
        if face.landmarks is not None or face.aligned is not None:
            return None
        dets = face.detections or []
        face.num_faces = len(dets)
        chosen, how = choose_face(dets, face.image.shape, face.box)
        if chosen is None:
            face.detail = f"{face.raw.source}: MTCNN found no face"
            return "no_face"
        face.landmarks, face.det_score, face.face_choice = chosen.landmarks, chosen.score, how
        x1, y1, x2, y2 = chosen.box
        face.box = np.array([x1, y1, x2 - x1, y2 - y1], np.float32)
        return None


class DetectionScore(Step):
    """Detector confidence below the threshold (only where a detector ran)."""

    name = "det_score"
    reasons = ("low_detection_score",)

    def __init__(self, min_score: float):
        super().__init__()
        self.min_score = min_score

    def check(self, face):
        if np.isfinite(face.det_score) and face.det_score < self.min_score:
            face.detail = f"score {face.det_score:.3f} < {self.min_score}"
            return "low_detection_score"
        return None


class FaceSize(Step):
    """Faces too small to align: the inter-ocular distance in source pixels."""

    name = "face_size"
    reasons = ("face_too_small",)

    def __init__(self, min_eye_distance: float):
        super().__init__()
        self.min_eye_distance = min_eye_distance

    def check(self, face):
        if face.landmarks is None:  # already-aligned source
            return None
        face.eye_distance = float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))
        if face.eye_distance < self.min_eye_distance:
            face.detail = f"eye distance {face.eye_distance:.1f}px < {self.min_eye_distance}px"
            return "face_too_small"
        return None


class Align(Step):
    name = "align"
    reasons = ("alignment_failed",)

    def check(self, face):
        if face.aligned is not None:
            return None
        try:
            face.aligned = align_face(face.image, face.landmarks)
        except AlignmentError as exc:
            face.detail = str(exc)
            return "alignment_failed"
        return None


def blur_score(aligned_rgb: np.ndarray) -> float:
    """Variance of the Laplacian over the central face region of the aligned crop."""
    gray = cv2.cvtColor(aligned_rgb, cv2.COLOR_RGB2GRAY)[24:104, 24:88]
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


class Blur(Step):
    name = "blur"
    reasons = ("too_blurry",)

    def __init__(self, min_blur: float):
        super().__init__()
        self.min_blur = min_blur

    def check(self, face):
        face.blur = blur_score(face.aligned)
        if face.blur < self.min_blur:
            face.detail = f"Laplacian variance {face.blur:.1f} < {self.min_blur}"
            return "too_blurry"
        return None


def difference_hash(rgb: np.ndarray, size: int = 16) -> int:
    """size*size-bit dHash of the whole image: robust to re-encoding, small shifts, rescaling."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (size + 1, size), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(rgb: np.ndarray, size: int = 32) -> np.ndarray:
    """Zero-mean, unit-norm grey thumbnail: dot products are correlation coefficients."""
    gray = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA)
    v = gray.astype(np.float32).ravel()
    v -= v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-6)


def relative_landmarks(face: Face) -> np.ndarray | None:
    if face.landmarks is None or face.image is None:
        return None
    h, w = face.image.shape[:2]
    return np.asarray(face.landmarks, np.float32) / np.array([w, h], np.float32)


class NearDuplicate(Step):
    """Near-identical photos within an identity (re-encoded, resized, slightly shifted).

    All must hold: the 256-bit dHashes are within `max_bits` (cheap screen), the 32x32
    thumbnails correlate above `min_correlation`, and the face sits at the same place in
    the frame (landmarks, relative to image size, within `max_landmark_shift`). Two photos
    of one person against similar plain backgrounds can pass the first two tests; they
    do not also put the face at the same spot with the same pose.

    Pre-aligned crops (insightface-rec) all put the face at the same spot, so the landmark
    guard says nothing there: they get their own, tighter hash and correlation bounds
    (`aligned_max_bits`, `aligned_min_correlation`), measured on aligned crops.
    """

    name = "near_duplicate"
    reasons = ("near_duplicate",)

    def __init__(self, max_bits: int, min_correlation: float = 0.8, max_landmark_shift: float = 0.03,
                 aligned_max_bits: int | None = None, aligned_min_correlation: float | None = None):
        super().__init__()
        self.max_bits, self.min_correlation, self.max_shift = max_bits, min_correlation, max_landmark_shift
        self.aligned_max_bits = max_bits if aligned_max_bits is None else aligned_max_bits
        self.aligned_min_correlation = min_correlation if aligned_min_correlation is None else aligned_min_correlation
        self.seen: dict[str, list[tuple]] = {}

    def check(self, face):
        face.dhash = difference_hash(face.image)
        pre_aligned = face.raw.aligned
        thumb, marks = thumbnail(face.image), None if pre_aligned else relative_landmarks(face)
        max_bits = self.aligned_max_bits if pre_aligned else self.max_bits
        min_corr = self.aligned_min_correlation if pre_aligned else self.min_correlation
        kept = self.seen.setdefault(face.raw.identity, [])
        for other, other_thumb, other_marks, key in kept:
            bits = (face.dhash ^ other).bit_count()
            if bits > max_bits:
                continue
            corr = float(thumb @ other_thumb)
            if corr < min_corr:
                continue
            shift = 0.0 if marks is None or other_marks is None else float(np.abs(marks - other_marks).mean())
            if shift <= self.max_shift:
                face.detail = f"{bits}/256 hash bits, correlation {corr:.3f}, landmark shift {shift:.3f} from {key}"
                return "near_duplicate"
        kept.append((face.dhash, thumb, marks, face.raw.key))
        return None


@dataclass
class StepChain:
    """The steps of stage 1, in order; the job assembles them from its config. Each
    partition runs a fresh copy (`copy.deepcopy`), so counts and duplicate memories never
    leak between partitions."""

    before_detection: list[Step] = field(default_factory=list)
    after_detection: list[Step] = field(default_factory=list)

    def all(self) -> list[Step]:
        return self.before_detection + self.after_detection

"""Reference figures for tests/test_mtcnn_reference.py: facenet-pytorch 2.6.0's own MTCNN
(default settings) on photos that ship in wheels.

Reproduce, from the repository root with the project venv (`make setup`):

    .venv/bin/python -m pip download --no-deps --only-binary=:all: -d /tmp/mtcnnref \\
        facenet-pytorch==2.6.0 insightface==2.1
    .venv/bin/python benchmarks/make_mtcnn_reference.py --wheels /tmp/mtcnnref

which rewrites tests/data/mtcnn_reference.json. Nothing gets installed. The reference code
is imported straight from the facenet-pytorch wheel (unzipped into a temporary folder) and
runs on the project's torch, numpy and OpenCV. Its one torchvision need, `batched_nms`, is
met by `_batched_nms` below, a transcription of torchvision's CPU implementation. The
wheel's own weights are used, after checking they are the ones `cleaning.detect.weights`
pins. The photos come from the installed scikit-image and matplotlib, and from the
insightface wheel, which is read as a zip and never imported or installed.

For each photo the JSON records where it comes from (distribution, version, path inside the
package, SHA-256 of the file), how it was decoded (the SHA-256 of the decoded RGB pixels, so a
test can tell when its OpenCV decodes a JPEG differently), and every face the reference
reports: box (x1, y1, x2, y2), probability and five landmarks (x, y), as float32 values
written exactly. A `note` says what a photo holds and which detections are false positives
(judged by eye).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import re
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.detect.weights import SHA256 as WEIGHTS_SHA256  # noqa: E402

OUT = ROOT / "tests" / "data" / "mtcnn_reference.json"
FACENET = ("facenet-pytorch", "2.6.0")
INSIGHTFACE = ("insightface", "2.1")
COMMAND = (".venv/bin/python -m pip download --no-deps --only-binary=:all: -d /tmp/mtcnnref "
           "facenet-pytorch==2.6.0 insightface==2.1 && "
           ".venv/bin/python benchmarks/make_mtcnn_reference.py --wheels /tmp/mtcnnref")
# facenet_pytorch.MTCNN's defaults, which the reference run keeps.
SETTINGS = {"min_face_size": 20, "thresholds": [0.6, 0.7, 0.7], "factor": 0.709}

# (name, distribution, import package, path inside the package, note)
PHOTOS = [
    ("astronaut", "scikit-image", "skimage", "data/astronaut.png", "Eileen Collins: one face"),
    ("camera", "scikit-image", "skimage", "data/camera.png",
     "the cameraman: one face; a greyscale PNG, decoded as three equal channels"),
    ("chelsea", "scikit-image", "skimage", "data/chelsea.png", "a cat: the reference finds no face"),
    ("motorcycle_left", "scikit-image", "skimage", "data/motorcycle_left.png",
     "no person: both reference detections are false positives on the front wheel"),
    ("grace_hopper", "matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "one face"),
    ("t1", "insightface", "insightface", "data/images/t1.jpg",
     "six people at a poker table, six faces; the two lowest-scored reference detections are "
     "false positives, on a hand holding a chip and on a metal bowl on the table"),
    ("Tom_Hanks_54745", "insightface", "insightface", "data/images/Tom_Hanks_54745.png",
     "an aligned 112x112 face crop"),
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_rgb(data: bytes) -> np.ndarray:
    """How the tests read the photos too: OpenCV, three channels, BGR turned to RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


# -- torchvision stand-in ------------------------------------------------------------------

def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's CPU `nms` kernel: the same sort call, the same float32 operations."""
    x1, y1, x2, y2 = (boxes[:, k].contiguous().numpy() for k in range(4))
    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).numpy()
    order = scores.sort(0, descending=True)[1].tolist()
    suppressed = np.zeros(len(order), bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = np.array(order[pos + 1:], dtype=np.int64)
        rest = rest[~suppressed[rest]]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr > iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.int64)


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.boxes.batched_nms on CPU, both of its code paths."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    if boxes.numel() > 4000:  # torchvision's "vanilla" path: NMS per class
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            curr = torch.where(idxs == class_id)[0]
            keep_mask[curr[_nms(boxes[curr], scores[curr], iou_threshold)]] = True
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True)[1]]
    # The "coordinate trick": classes moved apart so they never overlap.
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _stub_torchvision() -> None:
    names = ["torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
             "torchvision.transforms.functional"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["torchvision.ops.boxes"].batched_nms = _batched_nms
    # `transforms.functional` is imported for extract_face (cropping), which detect() never calls.
    for n in names[1:]:
        parent, _, child = n.rpartition(".")
        setattr(mods[parent], child, mods[n])
    sys.modules.update(mods)


def load_reference(wheel: Path, into: Path):
    """facenet_pytorch.models.mtcnn.MTCNN from the wheel, without the package's __init__
    (which imports InceptionResnetV1, requests and the training utilities)."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into, [m for m in zf.namelist() if m.startswith("facenet_pytorch/")])
    pkg_dir = into / "facenet_pytorch"
    for name, digest in WEIGHTS_SHA256.items():
        if sha256((pkg_dir / "data" / f"{name}.pt").read_bytes()) != digest:
            raise RuntimeError(f"{name}.pt in {wheel.name} is not the weights cleaning.detect.weights pins")
    _stub_torchvision()
    pkg = types.ModuleType("facenet_pytorch")
    pkg.__path__ = [str(pkg_dir)]
    sys.modules["facenet_pytorch"] = pkg
    from facenet_pytorch.models.mtcnn import MTCNN

    return MTCNN(min_face_size=SETTINGS["min_face_size"], thresholds=SETTINGS["thresholds"],
                 factor=SETTINGS["factor"])


def find_wheel(folder: Path, dist: str, version: str) -> Path:
    found = sorted(folder.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"no {dist}=={version} wheel in {folder}; run the pip download line of this script's docstring")
    return found[0]


def photo_bytes(dist: str, package: str, path: str, wheels: dict[str, Path]) -> tuple[bytes, str]:
    """The file's bytes and the version of the distribution it came from."""
    if dist in wheels:
        with zipfile.ZipFile(wheels[dist]) as zf:
            return zf.read(f"{package}/{path}"), wheels[dist].name.split("-")[1]
    spec = importlib.util.find_spec(package)
    return (Path(spec.origin).parent / path).read_bytes(), importlib.metadata.version(dist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, required=True, help="folder holding the downloaded wheels")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    facenet_wheel = find_wheel(args.wheels, *FACENET)
    wheels = {INSIGHTFACE[0]: find_wheel(args.wheels, *INSIGHTFACE)}
    photos = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        mtcnn = load_reference(facenet_wheel, Path(tmp))
        for name, dist, package, path, note in PHOTOS:
            data, version = photo_bytes(dist, package, path, wheels)
            img = decode_rgb(data)
            boxes, probs, points = mtcnn.detect(img, landmarks=True)
            faces = [] if boxes is None else [
                {"box": [float(v) for v in b], "prob": float(p), "landmarks": [[float(x), float(y)] for x, y in lm]}
                for b, p, lm in zip(boxes.astype(np.float32), np.asarray(probs, np.float32), points.astype(np.float32))
            ]
            photos.append({
                "name": name, "distribution": dist, "version": version, "package": package, "path": path,
                "sha256": sha256(data), "shape": list(img.shape), "decoded_sha256": sha256(img.tobytes()),
                "note": note, "faces": faces,
            })
            print(f"{name}: {len(faces)} face(s), probabilities {[round(f['prob'], 4) for f in faces]}")
    doc = {
        "generator": "benchmarks/make_mtcnn_reference.py",
        "command": COMMAND,
        "reference": {"distribution": FACENET[0], "version": FACENET[1], "wheel": facenet_wheel.name,
                      "wheel_sha256": sha256(facenet_wheel.read_bytes()), "weights_sha256": WEIGHTS_SHA256,
                      "call": "MTCNN(**settings).detect(rgb_uint8_array, landmarks=True)"},
        "settings": SETTINGS,
        "decoder": "cv2.imdecode(IMREAD_COLOR), then BGR to RGB",
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "opencv": cv2.__version__, "machine": platform.machine()},
        "faces_order": "as the reference returns them: largest box first",
        "photos": photos,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One line per innermost list of numbers (a box, a landmark), to keep the file readable.
    text = re.sub(r"\[\s*([^\[\]{}\"]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(doc, indent=1))
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

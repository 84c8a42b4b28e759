"""Our MTCNN against facenet-pytorch 2.6.0's own cascade, same weights and default settings,
on photos that ship in wheels.

The figures are tests/data/mtcnn_reference.json, made once by
benchmarks/make_mtcnn_reference.py (its docstring has the command). The photos are not in
the repository: they are read from the installed scikit-image and matplotlib, and from the
insightface wheel where one is at hand: installed, or a downloaded wheel in the folder named
by $MTCNN_REFERENCE_WHEELS (the script's pip download line puts it in /tmp/mtcnnref).
Without it the insightface photos (t1.jpg, six faces and two false positives) are skipped.

Every reference detection must be found, and nothing else. That includes the reference's
false positives (two on a motorcycle's front wheel, one on a hand and one on a metal bowl in
t1.jpg): our cascade does the reference's arithmetic, so it makes the same mistakes, and
nothing needs arguing away.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleaning.detect.mtcnn import MTCNN, crop_resize, crop_windows, nms
from cleaning.detect.weights import have_weights

REFERENCE = json.loads((Path(__file__).parent / "data" / "mtcnn_reference.json").read_text())
PHOTOS = {p["name"]: p for p in REFERENCE["photos"]}

# Measured on x86-64 CPU: every box, landmark and probability bit-identical to the reference
# for each photo detected alone; photos of one size detected in one batch (as here) move by
# up to 2e-5 px (a batched convolution sums in another order). The bound is float
# tolerance, with room for other CPUs' kernels.
FLOAT_TOL_PX = 1e-3
FLOAT_TOL_PROB = 1e-5
# The issue's bounds, which apply where this OpenCV decodes a JPEG to other pixels than the
# reference run's did (then float agreement is out of reach; the cascade still must agree).
DECODER_TOL_LANDMARK_PX = 1.0
DECODER_TOL_BOX_PX = 2.0
DECODER_TOL_PROB = 1e-2

needs_weights = pytest.mark.skipif(not have_weights(), reason="MTCNN weights not fetched (make setup)")


def photo_bytes(photo: dict) -> bytes | None:
    """The photo's file from its installed package, or from a wheel in $MTCNN_REFERENCE_WHEELS."""
    spec = importlib.util.find_spec(photo["package"])
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / photo["path"]
        if path.exists():
            return path.read_bytes()
    folder = os.environ.get("MTCNN_REFERENCE_WHEELS")
    if folder:
        for wheel in sorted(Path(folder).glob(f"{photo['distribution'].replace('-', '_')}-*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                member = f"{photo['package']}/{photo['path']}"
                if member in zf.namelist():
                    return zf.read(member)
    return None


def decode_rgb(data: bytes) -> np.ndarray:
    # As benchmarks/make_mtcnn_reference.py decodes them.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def detections():
    """Our detections for every photo at hand, all in one detect() call (equal sizes batch)."""
    torch.set_num_threads(2)
    names, images = [], []
    for name, photo in PHOTOS.items():
        data = photo_bytes(photo)
        if data is None:
            continue
        if hashlib.sha256(data).hexdigest() != photo["sha256"]:
            pytest.fail(f"{photo['distribution']}'s {photo['path']} is not the file the reference ran on "
                        f"(version {photo['version']}): rerun benchmarks/make_mtcnn_reference.py")
        names.append(name)
        images.append(decode_rgb(data))
    found = MTCNN().detect(images)
    return {n: (img, dets) for n, img, dets in zip(names, images, found)}


def match(reference: list[dict], ours: list) -> list[tuple[dict, object]]:
    """Pairs each reference face with our detection whose box is nearest (one to one)."""
    pairs, free = [], list(ours)
    for face in reference:
        assert free, "a reference face has no detection of ours left to match"
        dist = [np.abs(d.box - np.array(face["box"])).max() for d in free]
        pairs.append((face, free.pop(int(np.argmin(dist)))))
    return pairs


@needs_weights
@pytest.mark.parametrize("name", list(PHOTOS))
def test_detections_match_reference(detections, name):
    photo = PHOTOS[name]
    if name not in detections:
        pytest.skip(f"{photo['distribution']} is neither installed nor a wheel in $MTCNN_REFERENCE_WHEELS")
    img, ours = detections[name]
    same_pixels = hashlib.sha256(img.tobytes()).hexdigest() == photo["decoded_sha256"]
    tol_box, tol_lm, tol_prob = ((FLOAT_TOL_PX, FLOAT_TOL_PX, FLOAT_TOL_PROB) if same_pixels else
                                 (DECODER_TOL_BOX_PX, DECODER_TOL_LANDMARK_PX, DECODER_TOL_PROB))
    assert len(ours) == len(photo["faces"]), (
        f"{name}: reference {len(photo['faces'])} faces, ours {len(ours)}: "
        f"{[(d.box.round(1).tolist(), round(d.score, 4)) for d in ours]}")
    for face, det in match(photo["faces"], ours):
        box_err = float(np.abs(det.box - np.array(face["box"])).max())
        lm_err = float(np.linalg.norm(det.landmarks - np.array(face["landmarks"]), axis=1).max())
        prob_err = abs(det.score - face["prob"])
        where = f"{name}, reference box {np.round(face['box'], 1).tolist()} (pixels decoded alike: {same_pixels})"
        assert box_err <= tol_box, f"{where}: box off by {box_err:.3g} px"
        assert lm_err <= tol_lm, f"{where}: a landmark off by {lm_err:.3g} px"
        assert prob_err <= tol_prob, f"{where}: probability off by {prob_err:.3g}"


def test_reference_figures_cover_the_issue_photos():
    # The photos the issue names; the multi-face one is t1.jpg from the insightface wheel.
    assert {"astronaut", "grace_hopper", "t1"} <= set(PHOTOS)
    assert len(PHOTOS["t1"]["faces"]) == 8 and REFERENCE["settings"] == {
        "min_face_size": 20, "thresholds": [0.6, 0.7, 0.7], "factor": 0.709}


@pytest.mark.parametrize("size", [24, 48])
def test_crop_resize_is_area_interpolation_of_the_clipped_window(size):
    """Batched crops equal the reference's: slice the clipped window, F.interpolate(mode="area")."""
    g = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (2, 3, 97, 131), generator=g).float()
    xy = torch.rand(40, 2, generator=g) * torch.tensor([141.0, 107.0]) - 15  # some stick out
    side = torch.rand(40, 1, generator=g) * 90 + 2
    boxes = torch.cat([xy, xy + side], 1)
    boxes[0] = torch.tensor([140.0, 10.0, 160.0, 30.0])  # wholly right of the image: no crop
    image_index = torch.randint(0, 2, (40,), generator=g)
    crops, valid = crop_resize(images, image_index, boxes, size)
    x0, y0, x1, y1 = crop_windows(boxes, 97, 131)
    assert torch.equal(valid, (x1 > x0) & (y1 > y0)) and not valid[0] and valid.sum() > 25
    for k in torch.nonzero(valid).squeeze(1).tolist():
        window = images[image_index[k]:image_index[k] + 1, :, y0[k]:y1[k], x0[k]:x1[k]]
        assert torch.equal(crops[k], F.interpolate(window, size=(size, size), mode="area")[0]), k


@pytest.mark.parametrize("mode, inclusive", [("union", False), ("union", True), ("min", True)])
def test_nms_in_chunks_equals_one_pass(mode, inclusive):
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 200, (700, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(5, 40, (700, 2))], 1), dtype=torch.float32)
    scores = torch.tensor(rng.random(700), dtype=torch.float32)
    whole = nms(boxes, scores, 0.5, mode, max_candidates=10_000, inclusive=inclusive)
    assert torch.equal(nms(boxes, scores, 0.5, mode, max_candidates=37, inclusive=inclusive), whole)

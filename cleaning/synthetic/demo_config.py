"""The [demo] config section: the synthetic raw demo dataset (cleaning/synthetic/demo.py).

Its own module, free of the generator's imports (OpenCV, the renderer), so the config
loads fast."""

from __future__ import annotations

from dataclasses import dataclass

from arcface_core.settings import WORKERS, setting
from cleaning.formats import RECORD_ORDERS

_SHARE = "[0, 1]"
_COUNT = "[0, inf)"


@dataclass
class DemoConfig:
    identities: int = setting(300, range="[1, inf)", doc="identities of the training part")
    images_per_identity: int = setting(30, range="[1, inf)", doc=(
        "image slots per identity (the most, with images_per_identity_min)"))
    seed: int = setting(0, range=_COUNT, doc="random seed: the same seed writes the same dataset")
    image_size: int = setting(250, range="[64, 4096]", doc="side of each rendered photo, in pixels")
    # MS-Celeb-1M has far more; 10% is enough to measure whether de-noising finds it.
    label_noise: float = setting(0.10, range=_SHARE, doc="share of images filed under the wrong identity")
    # Uniform noise vs the look-alikes and co-stars of web-crawled celebrity photos.
    noise_sources: int = setting(0, range=_COUNT, doc=(
        "where a mislabelled image comes from: 0 = any other identity; k = one of the k identities "
        "that look most like the filed one (concentrated, confusable noise)"))
    # Web datasets mix many small identities with a few large ones.
    images_per_identity_min: int = setting(0, range=_COUNT, doc=(
        "each identity gets a number of image slots drawn uniformly from [images_per_identity_min, "
        "images_per_identity]; 0 = every identity gets images_per_identity"))
    exact_duplicate: float = setting(0.02, range=_SHARE, doc=(
        "share of images that are byte-identical copies of another"))
    near_duplicate: float = setting(0.02, range=_SHARE, doc=(
        "share of images that are re-encoded, rescaled or shifted copies"))
    undecodable: float = setting(0.01, range=_SHARE, doc="share of files that are not decodable images")
    zero_byte: float = setting(0.005, range=_SHARE, doc="share of empty files")
    no_face: float = setting(0.01, range=_SHARE, doc="share of photos without a face")
    tiny_face: float = setting(0.01, range=_SHARE, doc="share of photos whose face is too small to keep")
    blurred: float = setting(0.01, range=_SHARE, doc="share of photos blurred (too blurred to keep)")
    # The paper merges such identities.
    duplicate_identities: int = setting(2, range=_COUNT, doc="identities filed twice, under two ids")
    eval_overlap_identities: int = setting(3, range=_COUNT, doc=(
        "training identities that also appear in the evaluation pair set (must be removed)"))
    eval_identities: int = setting(40, range=_COUNT, doc="held-out identities the evaluation pair set is built from")
    eval_pairs: int = setting(600, range=_COUNT, doc="pairs in the evaluation pair set")
    ijb_subjects: int = setting(24, range=_COUNT, doc=(
        "subjects of the synthetic IJB-C-style set written beside the raw data (ijb/IJBC; 0: none)"))
    rec_order: str = setting("index", choices=RECORD_ORDERS, doc=(
        "how the insightface-rec layout lists its records: index (header, images, identity records) "
        "or face2rec2 (images, then header and identity records, as insightface's face2rec2.py writes)"))
    workers: int = setting(2, range=WORKERS, doc="processes rendering the photos")

"""The [demo] config section: the synthetic raw demo dataset (cleaning/synthetic/demo.py).

Its own module, free of the generator's imports (OpenCV, the renderer), so the config
loads fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    identities: int = 300
    images_per_identity: int = 30
    seed: int = 0
    image_size: int = 250
    # Share of images filed under the wrong identity (MS-Celeb-1M has far more; 10% is enough
    # to measure whether de-noising finds it).
    label_noise: float = 0.10
    # Where a mislabelled image comes from: 0 = any other identity (uniform noise); k = one of
    # the k identities that look most like the filed one (concentrated, confusable noise: the
    # look-alikes and co-stars of web-crawled celebrity photos).
    noise_sources: int = 0
    # Identity sizes: each identity gets a number of image slots drawn uniformly from
    # [images_per_identity_min, images_per_identity]; 0 = every identity gets
    # images_per_identity. Web datasets mix many small identities with a few large ones.
    images_per_identity_min: int = 0
    exact_duplicate: float = 0.02
    near_duplicate: float = 0.02
    undecodable: float = 0.01
    zero_byte: float = 0.005
    no_face: float = 0.01
    tiny_face: float = 0.01
    blurred: float = 0.01
    # Identities filed twice under two ids (the paper merges such identities).
    duplicate_identities: int = 2
    # Training identities that also appear in the evaluation pair set (must be removed).
    eval_overlap_identities: int = 3
    # Held-out identities used to build the evaluation pair set.
    eval_identities: int = 40
    eval_pairs: int = 600
    # Subjects of the synthetic IJB-C-style set written beside the raw data (ijb/IJBC; 0: none).
    ijb_subjects: int = 24
    # How the insightface-rec layout lists its records: "index" (header, images, identity
    # records) or "face2rec2" (images, then header and identity records, as insightface's
    # face2rec2.py writes train.rec/.idx).
    rec_order: str = "index"
    workers: int = 2

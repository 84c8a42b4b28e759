"""A refined dataset written straight as shards, for benchmarks that need many faces fast.

No rendering and no detection: each identity gets a smooth random colour field (a few
control points, bicubically upsampled to 112x112), each of its faces that field shifted and
lit a little differently plus sensor noise, encoded as JPEG at stage 1's quality (95). The
bytes decode at the cost of real aligned faces (same size, same quality, similar entropy),
which is what the data-path benchmarks need; the pictures are not faces and nothing should
be learnt from them.

    from benchmarks.synthetic_refined import write_synthetic_refined
    write_synthetic_refined("/tmp/shards", identities=1000, images_per_identity=20)
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa

from dataset import RefinedDataset, shards

JPEG_QUALITY = 95  # stage 1's default (cleaning.config.CleanConfig.jpeg_quality)


def synthetic_face(base: np.ndarray, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One (size, size, 3) uint8 image: the identity's field, shifted, relit, noisy."""
    field = cv2.resize(base, (size + 16, size + 16), interpolation=cv2.INTER_CUBIC)
    dx, dy = rng.integers(0, 16, 2)
    img = field[dy:dy + size, dx:dx + size] * rng.uniform(0.8, 1.2) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _identity_faces(seed: int, label: int, count: int, pool: list[bytes] | None = None) -> list[tuple]:
    rng = np.random.default_rng([seed, label])
    name = f"id{label:07d}"
    base = rng.uniform(40, 215, (4, 4, 3)).astype(np.float32)
    faces = []
    for i in range(count):
        if pool:  # bytes drawn from a pool: millions of rows at the speed of writing them
            data = pool[(label * count + i) % len(pool)]
        else:
            data = cv2.imencode(".jpg", synthetic_face(base, rng), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
        faces.append((data, label, name, f"{name}/{i:04d}.jpg"))
    return faces


def write_synthetic_refined(uri: str, identities: int, images_per_identity: int, seed: int = 0,
                            shard_faces: int = 20_000, row_group_rows: int = 1000, threads: int = 1,
                            distinct_images: int = 0) -> RefinedDataset:
    """A complete refined dataset (manifest last) of identities x images_per_identity faces;
    the same bytes for the same arguments, whatever `threads` (OpenCV encodes without the GIL).
    `distinct_images` > 0: rows reuse the JPEG bytes of that many faces (for sizes where
    encoding every face would take longer than the measurement)."""
    from concurrent.futures import ThreadPoolExecutor

    out = RefinedDataset.create(uri)
    pool = [f[0] for f in _identity_faces(seed, 2**31 - 1, distinct_images)] if distinct_images else None
    names, rows, shard_uris = [], [], []

    def flush():
        if not rows:
            return
        table = pa.table({
            "image": pa.array([r[0] for r in rows], pa.binary()),
            "label": pa.array([r[1] for r in rows], pa.int32()),
            "identity": pa.array([r[2] for r in rows], pa.string()),
            "key": pa.array([r[3] for r in rows], pa.string()),
            "source": pa.array(["synthetic"] * len(rows), pa.string()),
            "det_score": pa.array([float("nan")] * len(rows), pa.float32()),
            "landmarks": pa.array([[0.0] * 10] * len(rows), pa.list_(pa.float32(), 10)),
            "box": pa.array([[0.0, 0.0, 112.0, 112.0]] * len(rows), pa.list_(pa.float32(), 4)),
            "num_faces": pa.array([1] * len(rows), pa.int16()),
            "face_choice": pa.array(["given"] * len(rows), pa.string()),
            "eye_distance": pa.array([38.0] * len(rows), pa.float32()),
            "blur": pa.array([100.0] * len(rows), pa.float32()),
            "dhash": pa.array([bytes(32)] * len(rows), pa.binary(32)),
        }, schema=shards.SHARD_SCHEMA)
        shard_uri = out.shard(shards.part_name(len(shard_uris)) + ".parquet")
        shards.write_table(shard_uri, table, row_group_rows)
        shard_uris.append(shard_uri)
        rows.clear()

    with ThreadPoolExecutor(max(1, threads)) as workers:
        for faces in workers.map(lambda label: _identity_faces(seed, label, images_per_identity, pool),
                                 range(identities)):
            names.append(faces[0][2])
            rows.extend(faces)
            if len(rows) >= shard_faces:
                flush()
    flush()
    n = identities * images_per_identity
    out.write_manifest({
        "stage": "synthetic",
        "source": {"format": "synthetic", "uri": ""},
        "counts": {"read": n, "kept": n, "rejected": 0, "by_reason": {}, "by_step": {}},
        "num_classes": identities, "num_images": n,
        "identity_to_label": {name: i for i, name in enumerate(names)},
        "shards": [u.rsplit("/", 1)[-1] for u in shard_uris],
        "content_hash": shards.content_hash(shard_uris),
    })
    return RefinedDataset.open(uri)

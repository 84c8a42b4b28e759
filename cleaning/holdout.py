"""Hold identities out of a refined dataset for evaluation.

`arcface holdout` moves N identities out of the training data (they become rejects with
reason `held_out_for_evaluation`, so every input is still accounted for) and builds from
their faces:
  eval/holdout_pairs.bin       an insightface-format verification pair set (half same-person
                               pairs, half different-person, interleaved so every fold of
                               the 10-fold protocol is balanced)
  eval/holdout_faces.parquet   the faces themselves (image, identity) for 1:N identification
The remaining identities are relabelled 0..C-1 in their old order.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from cleaning import rewrite
from cleaning.formats.insightface_bin import dumps_pairs
from dataset import shards, storage
from dataset.refined import RefinedDataset

HELD_OUT = "holdout/held_out_for_evaluation"
PAIRS_FILE = "holdout_pairs.bin"
FACES_FILE = "holdout_faces.parquet"


def build_pairs(faces_by_identity: dict[str, list[bytes]], num_pairs: int, seed: int) -> tuple[list[bytes], list[bool]]:
    """Alternating same / different pairs; a same pair never repeats an image with itself."""
    rng = np.random.default_rng(seed)
    people = sorted(faces_by_identity)
    multi = [p for p in people if len(faces_by_identity[p]) >= 2]
    if not multi or len(people) < 2:
        raise ValueError("pairs need at least two identities, one of them with two images")
    images, issame = [], []
    for n in range(num_pairs):
        if n % 2 == 0:
            person = multi[rng.integers(len(multi))]
            i, j = rng.choice(len(faces_by_identity[person]), size=2, replace=False)
            images += [faces_by_identity[person][i], faces_by_identity[person][j]]
        else:
            a, b = rng.choice(len(people), size=2, replace=False)
            fa, fb = faces_by_identity[people[a]], faces_by_identity[people[b]]
            images += [fa[rng.integers(len(fa))], fb[rng.integers(len(fb))]]
        issame.append(n % 2 == 0)
    return images, issame


def split_holdout(src: RefinedDataset, dst: RefinedDataset, identities: int, pairs: int = 600, seed: int = 0,
                  min_images: int = 2) -> RefinedDataset:
    id_to_label: dict[str, int] = src.manifest.identity_to_label
    counts: dict[str, int] = {}
    for uri in src.shard_uris():
        for ident in shards.read_table(uri, columns=["identity"]).column("identity").to_pylist():
            counts[ident] = counts.get(ident, 0) + 1
    eligible = sorted(i for i, n in counts.items() if n >= min_images)
    if identities < 2 or identities > len(eligible) - 2:
        raise ValueError(f"can hold out 2..{len(eligible) - 2} identities with >= {min_images} images, "
                         f"asked for {identities}")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(eligible, size=identities, replace=False).tolist())
    remaining = sorted((i for i in id_to_label if i not in held), key=lambda i: id_to_label[i])
    new_label = {ident: n for n, ident in enumerate(remaining)}
    faces: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def decide(name: str, table: pa.Table) -> rewrite.ShardDecision:
        ids = table.column("identity").to_pylist()
        labels = np.array([-1 if i in held else new_label[i] for i in ids], np.int32)
        images = table.column("image")
        with lock:
            for row, ident in enumerate(ids):
                if ident in held:
                    faces.setdefault(ident, []).append(images[row].as_py())
        return rewrite.ShardDecision(labels, [HELD_OUT if i in held else None for i in ids])

    def write_eval_sets() -> None:
        for ident in faces:  # threads finish in any order; the pair set must not depend on it
            faces[ident].sort()
        images, issame = build_pairs(faces, pairs, seed)
        storage.write_bytes(dst.eval_file(PAIRS_FILE), dumps_pairs(images, issame))
        rows = [(img, ident) for ident in sorted(faces) for img in faces[ident]]
        shards.write_table(dst.eval_file(FACES_FILE),
                           pa.table({"image": [r[0] for r in rows], "identity": [r[1] for r in rows]}))

    return rewrite.rewrite_dataset(src, dst, decide, new_label, stage="holdout", before_manifest=write_eval_sets,
                                   extra={"holdout": {"identities": sorted(held), "pairs_file": dst.eval_file(PAIRS_FILE),
                                                      "faces_file": dst.eval_file(FACES_FILE), "pairs": pairs, "seed": seed}})

"""Are a duplicate pair's two folders one sample of one person's photos? (issue 29)

The seed sweep's missed merges are duplicate pairs the bootstrap model learns apart
(benchmarks/diagnose_missed_merges.py). This asks the photos, not a model: per demo seed of the
sweep, each injected duplicate pair's clean faces, aligned to 112x112 with the generator's own
landmarks (cleaning/align.py), shrunk to 28x28 grey and normalised per face; the distance
between the two folders' mean faces against the same distance with the faces' folders
shuffled (a permutation test). A small p: the two folders differ on raw pixels (pose, light,
expression drawn by chance), a difference a model trained on the two ids can learn.

    .venv/bin/python benchmarks/duplicate_pair_pixels.py [--seed-count 10] [--shuffles 1000]

The generator draws each image slot from (seed, identity, slot), so a slot clean at two noise
levels or kinds shows the same photo at both: a seed's pair is largely one draw of photos
however many sweep cases use it. Writes benchmarks/results/duplicate_pair_pixels.md (keeping
its hand-written "## Reading" section).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cleaning.align import align_face
from cleaning.synthetic.demo import generate
from pipelines.config import load_config
from sweep_refinement_seeds import unseen_seeds

SIDE = 28  # pixels a side: identity and pose survive, JPEG noise averages out


def clean_faces(root: Path, truth: dict, identity: str) -> np.ndarray:
    """The identity's faces with no injected defect, aligned, grey, SIDE x SIDE, zero mean and unit variance."""
    out = []
    for r in truth["images"]:
        if r["filed_identity"] == identity and not r["defects"]:
            face = align_face(cv2.imread(str(root / r["file"])), np.array(r["landmarks"]))
            v = cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (SIDE, SIDE)).astype(np.float64).ravel()
            out.append((v - v.mean()) / (v.std() + 1e-6))
    return np.array(out)


def folder_test(x: np.ndarray, y: np.ndarray, shuffles: int, rng) -> tuple[float, float, float]:
    """(distance between the mean faces, its median under shuffled folders, p)."""
    both, n = np.concatenate([x, y]), len(x)
    observed = float(np.linalg.norm(x.mean(0) - y.mean(0)))
    null = np.empty(shuffles)
    for i in range(shuffles):
        p = both[rng.permutation(len(both))]
        null[i] = np.linalg.norm(p[:n].mean(0) - p[n:].mean(0))
    return observed, float(np.median(null)), float((null >= observed).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed-count", type=int, default=10,
                    help="the sweep's seeds (benchmarks/sweep_refinement_seeds.py)")
    ap.add_argument("--identities", type=int, default=50)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--shuffles", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "duplicate_pair_pixels.md"))
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "demo-train.toml")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in unseen_seeds(args.seed_count):
            root = Path(tmp) / f"seed{seed}"
            # Label noise only chooses which slots are mislabelled; a slot clean at any level shows the same photo.
            demo = dataclasses.replace(cfg.demo, identities=args.identities, seed=seed, label_noise=0.3,
                                       images_per_identity=args.images_per_identity, noise_sources=0)
            generate(root, demo, ["vggface2"])
            truth = json.loads((root / "ground_truth.json").read_text())
            for a, b in truth["duplicate_identities"]:
                x, y = clean_faces(root, truth, a), clean_faces(root, truth, b)
                observed, null_median, p = folder_test(x, y, args.shuffles, rng)
                rows.append((seed, f"{a}/{b}", f"{len(x)}/{len(y)}", observed, null_median, p))
                print(f"seed {seed}: {a}/{b} p = {p:.3f}", flush=True)
    command = " ".join(["python benchmarks/duplicate_pair_pixels.py", shlex.join(sys.argv[1:])]).strip()
    lines = ["# Duplicate pairs on raw pixels (issue 29)", "", f"Command: `{command}`", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| seed | pair | clean faces | mean-face distance | shuffled median | p |",
             "|---:|---|---|---:|---:|---:|"]
    lines += [f"| {s} | {pair} | {n} | {d:.2f} | {m:.2f} | {p:.3f} |" for s, pair, n, d, m, p in rows]
    out = Path(args.out)
    reading = out.read_text().partition("\n## Reading")[1:] if out.exists() else ("", "")
    out.write_text("\n".join(lines) + "\n" + "".join(reading))  # a hand-written reading is kept
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""How far apart are near-duplicate copies and distinct photos when faces come pre-aligned?

Writes the demo as an insightface RecordIO (aligned 112x112 crops), then, within each
identity, measures the dHash distance (256 bits) and the 32x32 thumbnail correlation of
(a) each near-duplicate copy (rescaled, shifted, brightened, re-encoded) against its source
photo and (b) every pair of distinct clean photos; prints the ranges and what each candidate
rule catches. This set the `clean.near_duplicate_aligned_*` defaults.

    python benchmarks/measure_aligned_near_duplicates.py --seeds 11 12 --identities 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.readers import plan, read_partition  # noqa: E402
from cleaning.steps import difference_hash, thumbnail  # noqa: E402
from cleaning.synthetic.demo import DemoConfig, generate, input_root  # noqa: E402

RULES = [(64, 0.8), (24, 0.99), (16, 0.99), (24, 0.98)]


def measure(out: Path, identities: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    generate(out, DemoConfig(identities=identities, images_per_identity=30, seed=seed, near_duplicate=0.06,
                             workers=2), ["insightface-rec"])
    truth = {r["key"]: r for r in json.loads((out / "ground_truth.json").read_text())["images"]}
    faces, by_id = {}, {}
    for part in plan("insightface-rec", str(input_root(out, "insightface-rec")), 10**9):
        for s in read_partition(part):
            img = cv2.imdecode(np.frombuffer(s.data, np.uint8), cv2.IMREAD_COLOR) if s.data else None
            if img is not None:
                rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
                faces[s.key] = (difference_hash(rgb), thumbnail(rgb))
                by_id.setdefault(s.identity, []).append(s.key)
    copies, distinct = [], []
    for keys in by_id.values():
        source = keys[0]  # the demo copies slot 0
        for a in range(len(keys)):
            for b in range(a):
                ka, kb = keys[a], keys[b]
                defects = truth[ka]["defects"] + truth[kb]["defects"]
                figures = ((faces[ka][0] ^ faces[kb][0]).bit_count(), float(faces[ka][1] @ faces[kb][1]))
                if defects == ["near_duplicate"] and source in (ka, kb):
                    copies.append(figures)
                elif not defects:
                    distinct.append(figures)
    return np.array(copies), np.array(distinct)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--identities", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aligned_near_duplicates.md"))
    args = ap.parse_args()
    lines = ["# Near duplicates among pre-aligned crops (demo written as insightface RecordIO)", "",
             f"Command: `python benchmarks/measure_aligned_near_duplicates.py --seeds {' '.join(map(str, args.seeds))} "
             f"--identities {args.identities}`", "",
             "| seed | copies | copy bits max | copy corr min | distinct pairs | distinct bits min | distinct corr max |"
             + "".join(f" flagged at bits<={b}, corr>={c} (copies / distinct) |" for b, c in RULES),
             "|---" * (7 + len(RULES)) + "|"]
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            copies, distinct = measure(Path(tmp), args.identities, seed)
        row = [seed, len(copies), int(copies[:, 0].max()), f"{copies[:, 1].min():.4f}", len(distinct),
               int(distinct[:, 0].min()), f"{distinct[:, 1].max():.4f}"]
        for b, c in RULES:
            caught = int(((copies[:, 0] <= b) & (copies[:, 1] >= c)).sum())
            wrong = int(((distinct[:, 0] <= b) & (distinct[:, 1] >= c)).sum())
            row.append(f"{caught} / {wrong}")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    lines += ["", "The landmark guard of the unaligned rule is meaningless here (every crop puts the face at the "
              "template's spot): at its thresholds (64 bits, 0.8) thousands of distinct pairs are flagged. "
              "Correlation separates the two populations with a wide gap; the chosen rule is bits <= 24 and "
              "correlation >= 0.99 (`clean.near_duplicate_aligned_bits`, `..._correlation`)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

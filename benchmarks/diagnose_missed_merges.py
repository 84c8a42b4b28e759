"""Why a duplicate pair was left apart (issue 29): for each injected duplicate pair a sweep case
did not merge, its kept faces (the last round's intra-class step) weighed three ways - how
loosely the final model embeds the person (mean angle between its faces within each id and
across the two), their underlying centres' angle (true_centre_cos, what MergeIdentities
tests), and where that angle falls among the angles of the same faces with the two ids'
labels shuffled (a permutation test: above its 99th percentile, the model has learned the two
ids apart, and no test on these embeddings can call them one person without also joining
look-alikes).

    .venv/bin/python benchmarks/diagnose_missed_merges.py WORK [--shuffles 200]

WORK: a sweep's --work folder (benchmarks/sweep_refinement_seeds.py --keep-embeddings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from cleaning.denoise import Embeddings, EmbeddedSet, angle_deg, true_centre_cos
from pipelines.config import load_config
from pipelines.stage2_ray import denoise_steps
from replay_denoise import replay


def underlying_angle(x: np.ndarray, y: np.ndarray) -> float:
    return float(angle_deg(np.float64(true_centre_cos(torch.from_numpy(x), torch.from_numpy(y)))))


def mean_angle(x: np.ndarray, y: np.ndarray, same: bool) -> float:
    cos = np.clip(x @ y.T, -1, 1)
    if same:
        cos = cos[~np.eye(len(x), dtype=bool)]
    return float(np.degrees(np.arccos(cos)).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work")
    ap.add_argument("--shuffles", type=int, default=200)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "demo-train.toml").denoise
    rng = np.random.default_rng(0)
    for case in sorted(Path(args.work).glob("*x*/*.npz")):
        if not replay(case, cfg)["missed_merges"]:
            continue
        z = np.load(case)
        data = EmbeddedSet(Embeddings(z["embeddings"]), z["groups"].astype(np.int64), z["identities"].astype(object))
        for step in denoise_steps(cfg, None):  # (no evaluation faces: overlap changes no pair)
            step(data)
        names, emb, person = z["identities"].astype(str), z["embeddings"], z["person"].astype(str)
        for a, b in z["duplicates"].astype(str):
            ka, kb = data.kept & (names == a), data.kept & (names == b)
            if ka.any() and kb.any() and data.groups[ka][0] == data.groups[kb][0]:
                continue  # merged
            shown = [float((person[k] == b).mean()) if k.any() else 0.0 for k in (ka, kb)]
            if min(shown) < 0.5:
                print(f"{case.parent.name}/{case.stem} {a}/{b}: taken over - the share of their kept faces "
                      f"that show their person: {shown[0]:.2f}/{shown[1]:.2f}")
                continue
            x, y = emb[ka], emb[kb]
            if len(x) < 2 or len(y) < 2:
                print(f"{case.parent.name}/{case.stem} {a}/{b}: {len(x)} and {len(y)} faces kept: nothing to weigh")
                continue
            both = np.concatenate([x, y])
            shuffled = []
            for _ in range(args.shuffles):
                order = rng.permutation(len(both))
                shuffled.append(underlying_angle(both[order[:len(x)]], both[order[len(x):]]))
            observed = underlying_angle(x, y)
            p95, p99 = np.percentile(shuffled, [95, 99])
            print(f"{case.parent.name}/{case.stem} {a}/{b}: kept {len(x)}/{len(y)}; faces apart within "
                  f"{mean_angle(x, x, True):.1f}/{mean_angle(y, y, True):.1f} deg, "
                  f"across {mean_angle(x, y, False):.1f}; "
                  f"underlying centres {observed:.1f} deg, shuffled labels 95th/99th percentile {p95:.1f}/{p99:.1f}"
                  f"{' (learned apart)' if observed > p99 else ''}")


if __name__ == "__main__":
    main()

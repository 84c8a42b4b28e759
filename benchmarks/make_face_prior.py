"""A face model to start refinement's bootstrap from, made from generated identities that no
sweep draws: what a user brings as `train.init_backbone` (an insightface backbone, or their
last model), here made by the project since nothing downloads weights.

    .venv/bin/python benchmarks/make_face_prior.py --out /tmp/face_prior
    .venv/bin/python benchmarks/sweep_refinement_seeds.py ... --set train.init_backbone=/tmp/face_prior/backbone.pt

It renders a clean demo (`--identities` x `--images-per-identity`, demo seed `--seed`: the
demo draws each identity from (seed, index), so seed 1000's people are none of seeds 0-12's),
runs stage 1 on it, and trains the demo recipe's backbone (configs/demo-train.toml: tiny-s2,
128-d) on it for `--epochs` with one centre per class. Prints where backbone.pt is and copies
it to <out>/backbone.pt. Defaults take about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    from cleaning.synthetic.demo import generate
    from dataset.refined import RefinedDataset
    from pipelines.config import load_config
    from pipelines.stage1_dask import run_stage1
    from pipelines.training.driver import run_training

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a working folder; <out>/backbone.pt is the face model")
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000, help="demo seed (keep it out of the sweeps' seeds)")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_config(ROOT / "configs" / "demo-train.toml")
    demo = dataclasses.replace(cfg.demo, identities=args.identities, images_per_identity=args.images_per_identity,
                               seed=args.seed, label_noise=0.0)
    t = time.perf_counter()
    if not (out / "raw" / "ground_truth.json").exists():
        generate(out / "raw", demo, ["vggface2"])
    stage1 = run_stage1(str(out / "raw"), "vggface2", RefinedDataset.create(str(out / "stage1")), cfg.clean)
    train = dataclasses.replace(cfg.train, name="face_prior", storage=str(out / "runs"), epochs=args.epochs,
                                eval_every=0, registered_model="", subcentres=1)
    result = run_training(RefinedDataset.open(stage1.uri), train, cfg.margin, ray_address=cfg.services.ray_address)
    if result.error:
        raise SystemExit(f"training the face prior failed: {result.error}")
    shutil.copyfile(Path(result.checkpoint.path) / "backbone.pt", out / "backbone.pt")
    print(f"face prior: {out / 'backbone.pt'} ({args.identities} x {args.images_per_identity} generated faces, "
          f"seed {args.seed}, {args.epochs} epochs, {time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()

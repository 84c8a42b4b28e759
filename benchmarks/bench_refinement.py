"""Refinement end to end on demo data with known defects: stage-2 quality, and whether
training on the stage-2 output beats training on the stage-1 output at the same budget.

Usage (writes benchmarks/results/refinement_demo.{json,md}):
    .venv/bin/python benchmarks/bench_refinement.py [--identities 300 --images-per-identity 30 --steps 512]
    .venv/bin/python benchmarks/bench_refinement.py --label-noise 0.3 --results-name refinement_demo_noise30

1. Render the demo raw data (VGGFace2 layout; 10% label noise, duplicate identities,
   identities that also appear in the evaluation pairs, ...).
2. `run_refine`: stage 1 (Dask) -> bootstrap model (Ray Train, `denoise.bootstrap_epochs`)
   -> stage 2 (Ray). Score stage 2 against ground_truth.json.
3. Train the same recipe (configs/demo-train.toml) for the same number of steps on the stage-1
   and on the stage-2 output, then evaluate both on the demo's held-out pairs: all of them,
   and those without the overlap identities (which the stage-1 model has trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.formats.insightface_bin import dumps_pairs, loads_pairs  # noqa: E402
from cleaning.synthetic.demo import generate  # noqa: E402
from cleaning.synthetic.score import score_stage2  # noqa: E402
from cleaning.synthetic.demo import DemoConfig  # noqa: E402
from dataset.refined import eval_folder  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.denoise import run_refine  # noqa: E402
from pipelines.evaluate import evaluate  # noqa: E402
from pipelines.registry import load_embedder  # noqa: E402
from pipelines.training.driver import run_training  # noqa: E402


def pairs_without(bin_path: Path, truth: dict, out: Path) -> Path:
    """The pair set minus the pairs that involve training identities (the overlap ones)."""
    images, issame = loads_pairs(bin_path.read_bytes())
    overlap = set(truth["eval_overlap_identities"])
    keep = [i for i, pp in enumerate(truth["eval_pairs"]["pair_identities"]) if not overlap & set(pp)]
    out.write_bytes(dumps_pairs([im for i in keep for im in images[2 * i:2 * i + 2]], [issame[i] for i in keep]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--images-per-identity", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-noise", type=float, default=0.10, help="share of images filed under the wrong identity")
    ap.add_argument("--results-name", default="refinement_demo", help="file stem under --out")
    ap.add_argument("--eval-identities", type=int, default=100, help="held-out identities in the demo's eval sets")
    ap.add_argument("--eval-pairs", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=512, help="training steps for each of the two final models")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "demo-train.toml")
    times, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        generate(tmp / "raw", DemoConfig(identities=args.identities, images_per_identity=args.images_per_identity,
                                         seed=args.seed, label_noise=args.label_noise,
                                         eval_identities=args.eval_identities,
                                         eval_pairs=args.eval_pairs, workers=2), ["vggface2"])
        times["demo_data_s"] = time.perf_counter() - t
        truth = json.loads((tmp / "raw" / "ground_truth.json").read_text())
        t = time.perf_counter()
        summary = run_refine(str(tmp / "raw"), "vggface2", str(tmp / "refined"), cfg)
        times["refine_s"] = time.perf_counter() - t
        manifest = summary.stage2.manifest.to_dict()
        results["stage2_score"] = score_stage2(summary.stage2.uri, str(tmp / "raw" / "ground_truth.json"))
        results["counts"] = manifest["counts"]
        results["stage2_seconds"] = manifest["stage2"]["seconds"]

        all_pairs = Path(eval_folder(tmp / "raw")) / "demo_pairs.bin"
        clean_pairs = pairs_without(all_pairs, truth, tmp / "heldout_only.bin")
        faces = Path(eval_folder(tmp / "raw")) / "demo_faces.parquet"
        for name, data in (("stage1", summary.stage1), ("stage2", summary.stage2)):
            train = dataclasses.replace(cfg.train, name=f"on_{name}", storage=str(tmp / "runs"), max_steps=args.steps,
                                        epochs=1000, registered_model="", eval_every=0, checkpoint_every=args.steps)
            t = time.perf_counter()
            result = run_training(data, train, cfg.margin)
            times[f"train_on_{name}_s"] = time.perf_counter() - t
            if result.error:
                raise RuntimeError(result.error)
            embedder = load_embedder(result.checkpoint.path).embedder
            scores = evaluate(embedder, [str(all_pairs), str(clean_pairs)], [str(faces)])
            results[f"trained_on_{name}"] = {k.rsplit("-", 1)[0]: {m: v for m, v in r.items() if m != "roc"}
                                            for k, r in scores.items()}
    import ray
    import torch

    record = {"command": "python benchmarks/bench_refinement.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}, "
                         f"torch {torch.__version__}, ray {ray.__version__}",
              "demo": {"identities": args.identities, "images_per_identity": args.images_per_identity,
                       "seed": args.seed, "label_noise": args.label_noise, "eval_identities": args.eval_identities,
                       "eval_pairs": args.eval_pairs},
              "steps": args.steps, "batch": cfg.train.batch_size, "times": times, **results}
    out = Path(args.out)
    (out / f"{args.results_name}.json").write_text(json.dumps(record, indent=1))
    s, a, b = results["stage2_score"], results["trained_on_stage1"], results["trained_on_stage2"]
    md = [
        "# Refinement on demo data (stage 1 -> bootstrap -> stage 2), and training on its output",
        "", f"Command: `{record['command']}`  ", f"Machine: {record['machine']}  ",
        f"Demo: {args.identities} identities x {args.images_per_identity}, seed {args.seed}, label noise "
        f"{args.label_noise:.0%}, VGGFace2 layout, "
        f"{args.eval_identities} held-out identities / {args.eval_pairs} pairs; "
        f"refine {times['refine_s']:.0f} s (stage 2 alone {results['stage2_seconds']:.0f} s)", "",
        "## Stage 2 against the ground truth", "",
        "| | figure |", "|---|---|",
        f"| label noise reaching stage 2 | {s['label_noise']['reached_stage2']} |",
        f"| label noise precision | {s['label_noise']['precision']:.4f} |",
        f"| label noise recall | {s['label_noise']['recall']:.4f} |",
        f"| evaluation-overlap identities removed | {s['overlap_identities']['removed']} "
        f"(truth {s['overlap_identities']['truth']}) |",
        f"| duplicate identities merged | {len(s['duplicate_identities']['merged'])} of "
        f"{len(s['duplicate_identities']['truth'])}, other merges {s['duplicate_identities']['other_merges']} |",
        f"| clean faces kept | {s['clean_kept']:.4f} |",
        f"| kept + rejected = read | {s['accounted']} ({results['counts']['kept']} + {results['counts']['rejected']}"
        f" = {results['counts']['read']}) |", "",
        f"## Same recipe, same budget ({args.steps} steps x batch {cfg.train.batch_size}), held-out pairs", "",
        "| pair set | trained on stage 1 | trained on stage 2 |", "|---|---|---|",
    ]
    for key in a:
        if "rank1" in a[key]:
            md.append(f"| {key} rank-1 ({a[key]['trials']} trials, {a[key]['distractors']} distractors) | "
                      f"{a[key]['rank1']:.4f} | {b[key]['rank1']:.4f} |")
            continue
        md.append(f"| {key} accuracy | {a[key]['accuracy']:.4f} ± {a[key]['accuracy_std']:.4f} | "
                  f"{b[key]['accuracy']:.4f} ± {b[key]['accuracy_std']:.4f} |")
        for m in a[key]:
            if m.startswith("tar_at_far"):
                md.append(f"| {key} {m} | {a[key][m]:.4f} | {b[key][m]:.4f} |")
    md += ["", "`demo_pairs`: all held-out pairs (include the 3 overlap identities, which the stage-1 model trained "
           "on); `heldout_only`: the pairs without them; `demo_faces`: 1:N identification (MegaFace protocol) on "
           "the same held-out faces.", ""]
    (out / f"{args.results_name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Refinement end to end on demo data with known defects: stage-2 quality, and whether
training on the stage-2 output beats training on the stage-1 output at the same budget,
across label-noise levels.

Usage (writes benchmarks/results/<results-name>.{json,md}):
    .venv/bin/python benchmarks/bench_refinement.py [--identities 300 --images-per-identity 30 --steps 512]
    .venv/bin/python benchmarks/bench_refinement.py --label-noise 0.1 0.2 0.3 0.4 0.5 --seeds 0 1 \
        --images-per-identity-min 8 --images-per-identity 64 --results-name refinement_sweep
    ... --noise-sources 3      # noise from each identity's 3 look-alikes instead of anyone
    ... --set denoise.bootstrap_subcentres=3   # any config key, as `arcface --set`

For every (noise level, seed):
1. Render the demo raw data (VGGFace2 layout; label noise, duplicate identities, identities
   that also appear in the evaluation pairs, ...).
2. `run_clean_data`: stage 1 (Dask) -> bootstrap model (Ray Train, `denoise.bootstrap_epochs`)
   -> stage 2 (Ray). Score stage 2 against ground_truth.json.
3. Train the same recipe (configs/demo-train.toml) for the same number of steps on the stage-1
   and on the stage-2 output, then evaluate both on the demo's held-out pairs: all of them,
   and those without the overlap identities (which the stage-1 model has trained on).
One row per case in the table; everything measured in the JSON.
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
from dataset.refined import RefinedDataset, eval_folder  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.clean_data import run_clean_data  # noqa: E402
from pipelines.evaluate import evaluate  # noqa: E402
from pipelines.models import load_embedder  # noqa: E402
from pipelines.training.driver import run_training  # noqa: E402


def pairs_without(bin_path: Path, truth: dict, out: Path) -> Path:
    """The pair set minus the pairs that involve training identities (the overlap ones)."""
    images, issame = loads_pairs(bin_path.read_bytes())
    overlap = set(truth["eval_overlap_identities"])
    keep = [i for i, pp in enumerate(truth["eval_pairs"]["pair_identities"]) if not overlap & set(pp)]
    out.write_bytes(dumps_pairs([im for i in keep for im in images[2 * i:2 * i + 2]], [issame[i] for i in keep]))
    return out


def run_case(args, noise: float, seed: int, work: Path) -> dict:
    cfg = load_config(ROOT / "configs" / "demo-train.toml", overrides=args.set)
    times, results = {}, {}
    t = time.perf_counter()
    generate(work / "raw", DemoConfig(identities=args.identities, images_per_identity=args.images_per_identity,
                                      images_per_identity_min=args.images_per_identity_min, seed=seed,
                                      label_noise=noise, noise_sources=args.noise_sources,
                                      eval_identities=args.eval_identities, eval_pairs=args.eval_pairs, workers=2),
             ["vggface2"])
    times["demo_data_s"] = time.perf_counter() - t
    truth = json.loads((work / "raw" / "ground_truth.json").read_text())
    t = time.perf_counter()
    summary = run_clean_data(str(work / "raw"), "vggface2", str(work / "refined"), cfg)
    times["refine_s"] = time.perf_counter() - t
    manifest = summary.stage2.manifest.to_dict()
    results["stage2_score"] = score_stage2(summary.stage2.uri, str(work / "raw" / "ground_truth.json"))
    results["counts"] = manifest["counts"]
    results["stage2"] = {k: manifest["stage2"][k] for k in ("seconds", "steps", "merges")}
    all_pairs = Path(eval_folder(work / "raw")) / "demo_pairs.bin"
    clean_pairs = pairs_without(all_pairs, truth, work / "heldout_only.bin")
    faces = Path(eval_folder(work / "raw")) / "demo_faces.parquet"
    for name, data in (("stage1", summary.stage1), ("stage2", summary.stage2)):
        if not args.steps:
            continue
        train = dataclasses.replace(cfg.train, name=f"on_{name}", storage=str(work / "runs"), max_steps=args.steps,
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
    sizes = [sum(1 for r in truth["images"] if r["filed_identity"] == i)
             for i in {r["filed_identity"] for r in truth["images"]}]
    return {"label_noise": noise, "seed": seed, "identity_sizes": [min(sizes), max(sizes)],
            "times": times, **results}


def rejudge(args) -> None:
    """Stage 2 again, with the current rules, on the cases a --keep run left: each case's
    stage-1 data and last bootstrap model are reused (embeddings cached), so only the
    decisions are new; the training columns are not recomputed."""
    from pipelines.stage2_ray import run_stage2

    cfg = load_config(ROOT / "configs" / "demo-train.toml", overrides=args.set)
    cases = []
    for work in sorted(Path(args.rejudge).glob("noise*_seed*")):
        refined = work / "refined"
        markers = sorted(refined.glob("bootstrap*.json"), key=lambda p: (len(p.name), p.name))
        model = json.loads(markers[-1].read_text())["checkpoint"]
        stage1 = RefinedDataset.open(str(refined / "stage1"))
        out = RefinedDataset.create(str(refined / "stage2_rejudged"))
        run_stage2(stage1, out, model, cfg.denoise)
        noise, seed = work.name[5:].split("_seed")
        score = score_stage2(out.uri, str(work / "raw" / "ground_truth.json"))
        cases.append({"label_noise": float(noise), "seed": int(seed), "model": markers[-1].name,
                      "stage2_score": score, "times": {"refine_s": float("nan")}})
        print(_row(cases[-1]), flush=True)
    command = "python benchmarks/bench_refinement.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    (out / f"{args.results_name}.json").write_text(json.dumps({"command": command, "cases": cases}, indent=1))
    md = ["# Stage 2 re-judged with the current rules on the kept cases of a sweep", "",
          f"Command: `{command}`; each case's stage-1 data and last bootstrap model (named per row) reused, "
          "only stage 2's decisions are new (training columns: see the sweep).", "",
          "| noise | seed | noise precision | noise recall | false merges | duplicates merged | overlap removed "
          "| clean kept | trained on stage 1 | trained on stage 2 | refine s |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *[_row(c) for c in cases], ""]
    (out / f"{args.results_name}.md").write_text("\n".join(md))
    print("\n".join(md))


def _row(case: dict) -> str:
    s = case["stage2_score"]
    noise, dup = s["label_noise"], s["duplicate_identities"]
    cells = [f"{case['label_noise']:.1f}", str(case["seed"]), f"{noise['precision']:.4f}", f"{noise['recall']:.4f}",
             str(dup["other_merges"]) + (f" ({dup['other_merges_of_one_person']} of one person)"
                                         if dup.get("other_merges_of_one_person") else ""),
             f"{len(dup['merged'])}/{len(dup['truth'])}",
             f"{len(s['overlap_identities']['removed'])}/{len(s['overlap_identities']['truth'])}",
             f"{s['clean_kept']:.4f}"]
    for key in ("heldout_only",):
        for name in ("stage1", "stage2"):
            r = case.get(f"trained_on_{name}", {}).get(key)
            cells.append(f"{r['accuracy']:.4f} / {r['tar_at_far_0.001']:.4f}" if r else "-")
    cells.append(f"{case['times']['refine_s']:.0f}" if case["times"]["refine_s"] == case["times"]["refine_s"] else "-")
    return "| " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--images-per-identity", type=int, default=30, help="image slots per identity (the maximum)")
    ap.add_argument("--images-per-identity-min", type=int, default=0,
                    help="draw each identity's size from [this, --images-per-identity] (0: all the same)")
    ap.add_argument("--noise-sources", type=int, default=0,
                    help="0: mislabelled images show anyone; k: one of the identity's k look-alikes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--label-noise", type=float, nargs="+", default=[0.10],
                    help="shares of images filed under the wrong identity, one case each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every case (denoise.*, train.*), as `arcface --set`")
    ap.add_argument("--results-name", default="refinement_demo", help="file stem under --out")
    ap.add_argument("--eval-identities", type=int, default=100, help="held-out identities in the demo's eval sets")
    ap.add_argument("--eval-pairs", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=512,
                    help="training steps for each of the two final models (0: score stage 2 only)")
    ap.add_argument("--keep", default="", help="keep each case's data and models under this folder")
    ap.add_argument("--rejudge", default="", metavar="KEEP_DIR",
                    help="instead of a sweep: stage 2 again with the current rules on the cases a --keep run left")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.rejudge:
        return rejudge(args)
    cases = []
    for noise in args.label_noise:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(args.keep) / f"noise{noise:g}_seed{seed}" if args.keep else Path(tmp)
                case = run_case(args, noise, seed, work)
            cases.append(case)
            print(_row(case), flush=True)
    import ray
    import torch

    record = {"command": "python benchmarks/bench_refinement.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}, "
                         f"torch {torch.__version__}, ray {ray.__version__}",
              "demo": {"identities": args.identities, "images_per_identity": args.images_per_identity,
                       "images_per_identity_min": args.images_per_identity_min, "noise_sources": args.noise_sources,
                       "eval_identities": args.eval_identities, "eval_pairs": args.eval_pairs},
              "overrides": args.set, "steps": args.steps, "cases": cases}
    out = Path(args.out)
    (out / f"{args.results_name}.json").write_text(json.dumps(record, indent=1))
    sizes = (f"{args.images_per_identity_min}-{args.images_per_identity}" if args.images_per_identity_min
             else str(args.images_per_identity))
    md = [
        "# Refinement on demo data (stage 1 -> bootstrap -> stage 2) across label noise, and training on its output",
        "", f"Command: `{record['command']}`  ", f"Machine: {record['machine']}  ",
        f"Demo: {args.identities} identities of {sizes} image slots, "
        + ("uniform label noise" if not args.noise_sources else f"label noise from each identity's "
           f"{args.noise_sources} look-alikes") + f", VGGFace2 layout, {args.eval_identities} held-out identities / "
        f"{args.eval_pairs} pairs; config overrides: {', '.join(args.set) or 'none'}.", "",
        "Label-noise precision and recall are over the faces that reached stage 2; false merges are merged label "
        "groups that are not an injected duplicate pair; accuracy / TAR@FAR=1e-3 on the held-out pairs without the "
        f"overlap identities, after {args.steps} steps x batch 64 on each dataset (same recipe, same budget).", "",
        "| noise | seed | noise precision | noise recall | false merges | duplicates merged | overlap removed "
        "| clean kept | trained on stage 1 | trained on stage 2 | refine s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[_row(c) for c in cases], ""]
    (out / f"{args.results_name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

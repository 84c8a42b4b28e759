"""`arcface evaluate` embedding in this process against 1 and 2 Ray workers
(pipelines/eval_workers.py): wall time and figures on the demo's evaluation sets (the `.bin`
pair set and the identification set) and its IJB-C-style release.

    .venv/bin/python benchmarks/bench_evaluate_workers.py --out benchmarks/results/evaluate_workers

The model is an untrained checkpoint of `--backbone` (its figures are neither 0 nor 1, which
is all an equality check needs); the demo sets are rendered into a temporary folder. Each
timing is one whole `evaluate_model` call: for Ray workers that includes starting the actors
and loading the model in each (Ray itself is started once, before). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("ARCFACE_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from arcface_core.backbones import build_backbone  # noqa: E402
from cleaning.synthetic.demo import DemoConfig, generate  # noqa: E402
from pipelines.evaluate import evaluate_model, scalar_metrics  # noqa: E402
from pipelines.training import checkpoint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/evaluate_workers")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--embedding-size", type=int, default=128)
    ap.add_argument("--eval-pairs", type=int, default=300)
    ap.add_argument("--eval-identities", type=int, default=20)
    ap.add_argument("--ijb-subjects", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root, DemoConfig(identities=4, images_per_identity=2, eval_identities=args.eval_identities,
                                  eval_pairs=args.eval_pairs, ijb_subjects=args.ijb_subjects, seed=0, workers=1),
                 ["vggface2"])
        torch.manual_seed(0)
        ckpt = root / "ckpt"
        ckpt.mkdir()
        cfg = {"backbone": args.backbone, "embedding_size": args.embedding_size}
        checkpoint.write_backbone(str(ckpt), build_backbone(args.backbone, args.embedding_size).state_dict(), {}, {})
        checkpoint.write_state(str(ckpt), {"step": 1, "config": cfg})
        sets = {"pair_uris": [str(root / "eval/demo_pairs.bin")], "face_uris": [str(root / "eval/demo_faces.parquet")],
                "ijb_root": str(root / "ijb/IJBC")}

        import ray

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        runs = []
        reference = None
        for workers in [0, *args.workers]:
            load = os.getloadavg()[0]
            start = time.perf_counter()
            done = evaluate_model(str(ckpt), workers=workers, **sets)
            seconds = time.perf_counter() - start
            figures = scalar_metrics(done.results)
            reference = reference or figures
            diff = max(abs(figures[k] - reference[k]) for k in reference) if figures.keys() == reference.keys() else None
            images = {name: m.get("images") for name, m in done.results.items()}
            runs.append({"workers": workers, "where": "this process" if workers == 0 else f"{workers} Ray actor(s)",
                         "seconds": round(seconds, 2), "max_abs_figure_diff_vs_in_process": diff,
                         "load_average_before": round(load, 2), "figures": figures})
            print(f"workers={workers}: {seconds:.1f} s, max |figure - in-process| = {diff}", flush=True)
        ray.shutdown()
        pair_images = 2 * args.eval_pairs
        ijb_name = done.ijb_name

    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "ray_cpus": args.ray_cpus, "torch_threads": torch.get_num_threads()},
        "model": cfg, "sets": {"pair_images": pair_images, "ijb": ijb_name, "ijb_images": images.get(ijb_name)},
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Evaluation embedding: in process vs Ray workers", "",
             f"`{result['command']}`", "",
             f"Model: untrained `{args.backbone}` ({args.embedding_size}-d). Sets: the demo's `.bin` pair set "
             f"({pair_images} images), its identification set, its IJB-C-style release ({images.get(ijb_name)} images, "
             f"flip test). Machine: {os.cpu_count()} CPUs shared with other work; Ray started with "
             f"{args.ray_cpus} CPUs. Each time is one whole evaluate_model call (actors started and the model "
             "loaded in each included).", "",
             "| embedding in | seconds | max abs figure difference vs in-process | load average before |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['where']} | {r['seconds']:.1f} | {r['max_abs_figure_diff_vs_in_process']:.2e} | "
              f"{r['load_average_before']:.1f} |" for r in runs]
    keys = [k for k in runs[0]["figures"] if k.endswith((".accuracy", ".rank1", "tar_at_far_0.01", "tar_at_far_0.1"))]
    lines += ["", "| figure | " + " | ".join(r["where"] for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    lines += [f"| {k} | " + " | ".join(f"{r['figures'][k]:.6f}" for r in runs) + " |" for k in keys]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage-1 quality on demo data with known defects: recall and precision per defect.

Usage (writes benchmarks/results/stage1_quality.{json,md}):
    .venv/bin/python benchmarks/score_stage1_demo.py [--identities 80 --images-per-identity 25 --seed 3]

Renders the demo in all three raw layouts, runs `run_stage1` on each, and scores the
outcome against ground_truth.json with `cleaning.synthetic.score.score_stage1`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cleaning.synthetic.demo import FORMATS, generate  # noqa: E402
from cleaning.synthetic.score import score_stage1  # noqa: E402
from cleaning.synthetic.demo import DemoConfig, input_root  # noqa: E402
from dataset import RefinedDataset  # noqa: E402
from pipelines.stage1_dask import CleanConfig, run_stage1  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=80)
    ap.add_argument("--images-per-identity", type=int, default=25)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "raw", DemoConfig(identities=args.identities, images_per_identity=args.images_per_identity,
                                         seed=args.seed, workers=2), list(FORMATS))
        for fmt in FORMATS:
            src = input_root(tmp / "raw" / fmt, fmt)
            run_stage1(str(src), fmt, RefinedDataset.create(tmp / fmt), CleanConfig())
            results[fmt] = score_stage1(str(tmp / fmt), str(tmp / "raw" / fmt / "ground_truth.json"))
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage1_quality.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    lines = ["# Stage 1 quality on demo data (recall / precision per injected defect)", "",
             f"`{command}` on {time.strftime('%Y-%m-%d %H:%M')}. A defect is recalled when its image is "
             "rejected with a reason that stands for it (cleaning/synthetic/score.py).", "",
             "| defect | " + " | ".join(FORMATS) + " |", "|---|" + "---:|" * len(FORMATS)]
    defects = sorted({d for r in results.values() for d in r["per_defect"]})
    for d in defects:
        cells = []
        for fmt in FORMATS:
            f = results[fmt]["per_defect"].get(d)
            cells.append(f"{f['recall']:.2f} / {f['precision']:.2f} (n={f['n']})" if f else "-")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("| clean images kept | " + " | ".join(f"{results[f]['clean_kept']:.3f}" for f in FORMATS) + " |")
    lines.append("| label noise kept (stage 2's job) | " +
                 " | ".join(f"{results[f]['label_noise_kept']:.3f}" for f in FORMATS) + " |")
    (out / "stage1_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

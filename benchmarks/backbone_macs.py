"""Parameters and multiply-accumulates of every backbone, beside arcface_torch's model-zoo FLOPs.

Usage (writes benchmarks/results/backbone_macs.{json,md}):
    .venv/bin/python benchmarks/backbone_macs.py

Each backbone is built on the meta device (shapes only: r2060's 1.1 G parameters take no
memory) and counted by `arcface_core.backbones.count_macs` (torch's FlopCounterMode over one
112x112 face in eval mode: convolutions, linear layers, attention products). The zoo column
is the "GFLOPs" arcface_torch's README quotes (recognition/arcface_torch/README.md, model-zoo
tables; ptflops' multiply-accumulates, which also count batch-norm and activation element
operations). Counting needs no compute, so the figures do not depend on the machine.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arcface_core.backbones import BACKBONES, count_macs, count_parameters  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
SOURCE = ("arcface_torch README, model-zoo tables (github.com/deepinsight/insightface, "
          "recognition/arcface_torch/README.md, commit 7fadd420)")


def main() -> None:
    rows = []
    for name, spec in BACKBONES.items():
        with torch.device("meta"):
            model = spec.build(512, 0.0)
        macs = count_macs(model)
        rows.append({"backbone": name, "arcface_torch": spec.insightface, "params_m": count_parameters(model) / 1e6,
                     "gmacs": macs / 1e9, "zoo_gflops": spec.zoo_gflops,
                     "ratio": (macs / 1e9 / spec.zoo_gflops) if spec.zoo_gflops else None})
        print(f"{name:22s} {rows[-1]['params_m']:9.2f} M params {rows[-1]['gmacs']:8.3f} GMACs "
              f"zoo {spec.zoo_gflops if spec.zoo_gflops else '-'}")
    OUT.mkdir(exist_ok=True)
    meta = {"command": "python benchmarks/backbone_macs.py", "date": time.strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "python": platform.python_version(), "zoo_source": SOURCE,
            "embedding_size": 512, "input": "1x3x112x112, eval mode"}
    (OUT / "backbone_macs.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Backbones: parameters and MACs beside arcface_torch's model zoo", "",
             f"`{meta['command']}` on {meta['date']} (torch {meta['torch']}); 512-d embeddings, one 112x112 face, "
             "eval mode. MACs counted from shapes (FlopCounterMode: convolutions, linear layers, attention products; "
             "FLOPs / 2). Zoo: the GFLOPs arcface_torch's README quotes (ptflops MACs, which also count batch-norm "
             f"and activation element operations); source: {SOURCE}. '-': the README gives no figure.", "",
             "| backbone | arcface_torch name | params (M) | GMACs (ours) | zoo GFLOPs | ours / zoo |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        zoo = r["zoo_gflops"] if r["zoo_gflops"] else "-"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
        lines.append(f"| {r['backbone']} | {r['arcface_torch'] or '-'} | {r['params_m']:.2f} | {r['gmacs']:.3f} | "
                     f"{zoo} | {ratio} |")
    (OUT / "backbone_macs.md").write_text("\n".join(lines) + "\n")
    print(f"written to {OUT / 'backbone_macs.md'}")


if __name__ == "__main__":
    main()

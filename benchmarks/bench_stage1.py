"""Stage-1 refinement throughput (images/s per core) on demo data and on real photos.

Usage (writes benchmarks/results/stage1_cpu.{json,md}):
    .venv/bin/python benchmarks/bench_stage1.py [--identities 60 --images-per-identity 20 --photos 240]

Cases, each a full `run_stage1` on a local Dask cluster of `--workers` single-threaded
workers (so cores = workers):
  demo/vggface2      landmarks come with the data: decode, align, filters
  demo/image-folder  the same images through MTCNN detection
  photos/512px       real photos from pip wheels (scikit-image's astronaut, matplotlib's
                     Grace Hopper), 512 px, each copy rotated/shifted/rescaled so they differ
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import skimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cleaning.synthetic.demo import generate  # noqa: E402
from cleaning.synthetic.demo import DemoConfig  # noqa: E402
from dataset import RefinedDataset  # noqa: E402
from pipelines.stage1_dask import CleanConfig, run_stage1  # noqa: E402


def make_photos(root: Path, count: int, seed: int = 0) -> None:
    sources = [cv2.imread(str(Path(skimage.__file__).parent / "data" / "astronaut.png")),
               cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))]
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = sources[i % 2]
        scale = 512 / max(img.shape[:2]) * rng.uniform(0.85, 1.0)
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-15, 15), scale)
        m[:, 2] += rng.uniform(-20, 20, 2) + (np.array([512, 512]) - np.array([w, h]) * scale) / 2
        out = cv2.warpAffine(img, m, (512, 512), borderMode=cv2.BORDER_REFLECT)
        folder = root / f"person{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), out, [cv2.IMWRITE_JPEG_QUALITY, 92])


def run_case(name: str, src: str, fmt: str, workers: int, out_root: Path) -> dict:
    cfg = CleanConfig(workers=workers, records_per_partition=200)
    start = time.perf_counter()
    manifest = run_stage1(src, fmt, RefinedDataset.create(out_root / name.replace("/", "_")),
                              cfg).manifest.to_dict()
    seconds = time.perf_counter() - start
    read = manifest["counts"]["read"]
    return {"case": name, "images": read, "kept": manifest["counts"]["kept"], "seconds": round(seconds, 1),
            "images_per_s": round(read / seconds, 1), "images_per_s_per_core": round(read / seconds / workers, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=60)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--photos", type=int, default=240)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "demo", DemoConfig(identities=args.identities, images_per_identity=args.images_per_identity,
                                          seed=1, workers=args.workers), ["vggface2", "image-folder"])
        make_photos(tmp / "photos", args.photos)
        rows.append(run_case("demo/vggface2", str(tmp / "demo" / "vggface2"), "vggface2", args.workers, tmp / "out"))
        rows.append(run_case("demo/image-folder", str(tmp / "demo" / "image-folder" / "images"), "image-folder",
                             args.workers, tmp / "out"))
        rows.append(run_case("photos/512px", str(tmp / "photos"), "image-folder", args.workers, tmp / "out"))
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
            "workers": args.workers}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stage1_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Stage 1 throughput (CPU)", "", f"`{meta['command']}` on {meta['date']} ({meta['machine']}, torch "
             f"{meta['torch']}); a Dask LocalCluster of {args.workers} single-threaded workers; wall time includes "
             "cluster start, planning, labelling, manifest and report.", "",
             "| case | images | kept | seconds | images/s | images/s per core |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['images']} | {r['kept']} | {r['seconds']} | {r['images_per_s']} | "
                     f"{r['images_per_s_per_core']} |")
    (out / "stage1_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

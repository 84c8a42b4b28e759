"""Training input throughput: our per-worker shard reader against Ray Data, same shards.

Usage (writes benchmarks/results/data_path_cpu.{json,md}):
    .venv/bin/python benchmarks/bench_data_path.py --data data/demo/stage1 [--batch 128 --batches 40]

Both read the same refined shards, decode the JPEGs, flip at random and normalise to CHW
float32, and hand out batches of `--batch`; one consumer process, 2 decode threads for ours,
Ray Data on a local Ray instance with the machine's CPUs. Reported as images/s and images/s
per core, with the ratio against Ray Data measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.train_data import BatchStream, ShardDataset, decode_face  # noqa: E402


def bench_ours(data_uri: str, batch: int, batches: int, threads: int) -> float:
    data = ShardDataset(data_uri)
    stream = BatchStream(data, batch, 0, 1, threads=threads)
    steps = min(batches, data.steps_per_epoch(batch))
    start = time.perf_counter()
    n = 0
    for _, images, _ in stream.iterate(0, 0, steps):
        n += len(images)
    seconds = time.perf_counter() - start
    stream.close()
    return n / seconds


def bench_ray_data(data_uri: str, batch: int, batches: int) -> float:
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        import ray.data

        def decode(rows):
            flips = np.random.random(len(rows["image"])) < 0.5
            faces = np.stack([decode_face(b, f) for b, f in zip(rows["image"], flips)])
            return {"image": faces, "label": np.asarray(rows["label"])}

        ds = ray.data.read_parquet(os.path.join(os.path.abspath(data_uri), "shards"), columns=["image", "label"])
        ds = ds.map_batches(decode, batch_size=batch, batch_format="numpy")
        it = ds.iter_torch_batches(batch_size=batch, drop_last=True)
        start, n = None, 0
        for i, b in enumerate(it):
            if i == 0:
                start = time.perf_counter()  # the first batch includes Ray Data's plan/launch
                continue
            n += len(b["image"])
            if i >= batches:
                break
        return n / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo/stage1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    ours = bench_ours(args.data, args.batch, args.batches, args.threads)
    ray_data = bench_ray_data(args.data, args.batch, args.batches)
    rows = [{"reader": "per-worker BatchStream", "images_per_s": round(ours, 1),
             "images_per_s_per_core": round(ours / cores, 1), "vs_ray_data": round(ours / ray_data, 2)},
            {"reader": "Ray Data (read_parquet + map_batches)", "images_per_s": round(ray_data, 1),
             "images_per_s_per_core": round(ray_data / cores, 1), "vs_ray_data": 1.0}]
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {cores} cpus"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_path_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Training input: per-worker reader vs Ray Data (CPU)", "",
             f"`{meta['command']}` on {meta['date']} ({meta['machine']}); batch {args.batch}, decode + flip + "
             "normalise.", "", "| reader | images/s | images/s per core | ratio vs Ray Data |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['images_per_s']} | {r['images_per_s_per_core']} | {r['vs_ray_data']}x |")
    (out / "data_path_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

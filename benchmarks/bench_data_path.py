"""Training input throughput: our per-worker shard reader against (a) reading the same
images from an MXNet RecordIO file the way insightface's loader does, and (b) Ray Data.

Usage (writes benchmarks/results/data_path_cpu.{json,md}):
    .venv/bin/python benchmarks/bench_data_path.py [--data data/demo/refined/stage2] [--batch 128 --batches 40]
Without --data (or when it does not exist) it writes a synthetic refined dataset of 9,000
faces first (benchmarks/synthetic_refined.py: 112x112 JPEGs at stage 1's quality).

All readers hand out batches of `--batch` faces decoded from the same JPEG bytes, flipped at
random and normalised to CHW float32:
  * ours (CPU training): BatchStream over the Parquet shards (row groups read whole, one
    batch ahead; `--threads` tasks of a chunk each decode, mirror and normalise straight into
    one float batch buffer);
  * ours, to the GPU hand-off: the same reader decoding into one uint8 batch buffer - what a
    GPU worker's CPU does (the uint8 batch crosses PCIe; mirror and normalise run on the GPU);
  * rec: the same images written to train.rec/.idx (cleaning/formats/recordio.py), read as
    arcface_torch's MXFaceDataset does - shuffled indices, per sample: seek by index, read
    the record, unpack, decode, flip, normalise - on the same number of threads;
  * Ray Data: read_parquet + map_batches on a local Ray instance with the machine's CPUs.
Reported as images/s and images/s per core, with ratios against the RecordIO baseline
measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import RefinedDataset  # noqa: E402
from pipelines.training.data import BatchStream, ShardDataset, decode_face  # noqa: E402


def bench_ours(data_uri: str, batch: int, batches: int, threads: int, on_host: bool) -> float:
    data = ShardDataset(data_uri)
    stream = BatchStream(data, batch, 0, 1, threads=threads, prepare_on_host=on_host)
    steps = min(batches + 1, data.steps_per_epoch(batch))
    start, n = None, 0
    for i, (_, b) in enumerate(stream.iterate(0, 0, steps)):
        if i == 0:  # as for every reader: the first batch pays one-time imports and thread start
            start = time.perf_counter()
            continue
        n += len(b.images)
    seconds = time.perf_counter() - start
    stream.close()
    return n / seconds


def bench_rec(data_uri: str, batch: int, batches: int, threads: int, tmp: str) -> float:
    """The insightface way: random access into train.rec by index, one sample at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from cleaning.formats.recordio import write_rec
    from cleaning.readers import read_record, unpack_record

    data = ShardDataset(data_uri)
    images, labels = data.fetch(np.arange(data.num_samples))  # the same bytes, in the shards' order
    n = write_rec(os.path.join(tmp, "train"), zip(labels.tolist(), images))
    offsets = [int(line.split("\t")[1]) for line in open(os.path.join(tmp, "train.idx"))]
    local = threading.local()

    def load(i: int):
        fh = getattr(local, "fh", None)
        if fh is None:
            fh = local.fh = open(os.path.join(tmp, "train.rec"), "rb")
        _, labels, _, jpeg = unpack_record(read_record(fh, offsets[i]))
        return decode_face(jpeg, np.random.random() < 0.5), int(labels[0])

    order = np.random.default_rng(0).permutation(n)
    steps = min(batches + 1, n // batch)
    with ThreadPoolExecutor(threads) as pool:
        start, done = None, 0
        for b in range(steps):
            samples = list(pool.map(load, order[b * batch:(b + 1) * batch]))
            _ = torch.from_numpy(np.stack([s[0] for s in samples]))  # default_collate's stack
            if b == 0:
                start = time.perf_counter()
                continue
            done += len(samples)
        return done / (time.perf_counter() - start)


def bench_ray_data(data_uri: str, batch: int, batches: int) -> float:
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        import ray.data

        def decode(rows):
            flips = np.random.random(len(rows["image"])) < 0.5
            faces = np.stack([decode_face(b, f) for b, f in zip(rows["image"], flips)])
            return {"image": faces, "label": np.asarray(rows["label"])}

        ds = ray.data.read_parquet(RefinedDataset.open(data_uri).shard_uris(), columns=["image", "label"])
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
    ap.add_argument("--data", default="", help="a refined dataset; default: a synthetic one of 9,000 faces")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    scratch = tempfile.TemporaryDirectory()
    if not args.data or not os.path.exists(args.data):
        from benchmarks.synthetic_refined import write_synthetic_refined

        args.data = os.path.join(scratch.name, "synthetic")
        write_synthetic_refined(args.data, identities=300, images_per_identity=30)
        data_note = "a synthetic refined dataset of 9,000 faces (benchmarks/synthetic_refined.py)"
    else:
        data_note = args.data
    ours = bench_ours(args.data, args.batch, args.batches, args.threads, on_host=True)
    handoff = bench_ours(args.data, args.batch, args.batches, args.threads, on_host=False)
    with tempfile.TemporaryDirectory() as tmp:
        rec = bench_rec(args.data, args.batch, args.batches, args.threads, tmp)
    ray_data = bench_ray_data(args.data, args.batch, args.batches)
    scratch.cleanup()
    rows = [{"reader": "ours (CPU training): BatchStream over Parquet shards, float batch", "images_per_s": ours},
            {"reader": "ours, to the GPU hand-off: uint8 batch (normalise/mirror run on the device)",
             "images_per_s": handoff},
            {"reader": "baseline: MXNet RecordIO, insightface-style (seek by index, decode per sample)",
             "images_per_s": rec},
            {"reader": "Ray Data (read_parquet + map_batches)", "images_per_s": ray_data}]
    for r in rows:
        r["images_per_s_per_core"] = round(r["images_per_s"] / cores, 1)
        r["vs_rec"] = round(r["images_per_s"] / rec, 2)
        r["images_per_s"] = round(r["images_per_s"], 1)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "data": data_note,
            "machine": f"{platform.machine()}, {cores} cpus", "threads": args.threads, "batch": args.batch}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_path_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Training input: shards vs RecordIO vs Ray Data (CPU)", "",
             f"`{meta['command']}` on {meta['date']} ({meta['machine']}); data: {data_note}; batch {args.batch}, "
             f"{args.threads} decode threads, decode + flip + normalise, the same JPEG bytes in every reader.", "",
             "| reader | images/s | images/s per core | ratio vs RecordIO |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['images_per_s']} | {r['images_per_s_per_core']} | {r['vs_rec']}x |")
    (out / "data_path_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

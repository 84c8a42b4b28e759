"""The training data path as the dataset grows to MS1MV2's size: what a Ray Train worker pays
to open a refined dataset of N rows, and to serve batches at the start and at the end of an
epoch, and to find its place when resuming.

Usage (writes benchmarks/results/data_scale.{json,md}):
    .venv/bin/python benchmarks/bench_data_scale.py [--faces 58000 580000 5800000] [--work /tmp]

For each size, a synthetic refined dataset of N faces (68 per identity, MS1MV2's ratio: 85K
identities at 5.8M) is written (benchmarks/synthetic_refined.py, JPEG bytes from a pool of
2,000 distinct 112x112 faces, so writing takes minutes, not the hour encoding would; decoding
costs the same), then a fresh process plays one worker of two, as pipelines/training/data.py
serves Ray Train: ShardDataset (opening: every shard's footer), BatchStream (global batch
512, its half, CPU preparation on 2 threads). Measured: opening time and resident memory,
the first batch of an epoch (it computes the epoch's order), the median batch over 20 at the
start and over 20 at the end of the epoch, the resume lookup (the sample indices of a step
near the end of an epoch), and the process's peak memory. The dataset is deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.stage1 import peak_rss_mib  # noqa: E402
from benchmarks.scaling import growth_exponents, measure_in_process, report  # noqa: E402

FACES_PER_IDENTITY = 68


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(uri: str, batch: int, timed: int) -> dict:
    """One worker (rank 0 of 2), in this process."""
    from pipelines.training.data import BatchStream, ShardDataset

    out = {"rss_before_mib": _rss_mib()}
    t = time.perf_counter()
    data = ShardDataset(uri)
    out["open_s"] = time.perf_counter() - t
    out["rss_after_open_mib"] = _rss_mib()
    stream = BatchStream(data, batch, rank=0, world=2, threads=2, prepare_on_host=True)
    steps = data.steps_per_epoch(batch)

    def batches(first: int) -> list[float]:
        times = []
        t = time.perf_counter()
        for _ in stream.iterate(0, first, first + timed):
            now = time.perf_counter()
            times.append(now - t)
            t = now
        return times

    t = time.perf_counter()
    stream.samples(0, 0)  # the epoch's order
    out["epoch_order_s"] = time.perf_counter() - t
    start = batches(0)
    out["first_batch_s"], out["batch_start_median_s"] = start[0], float(np.median(start[1:]))
    stream._orders.clear()  # a resumed worker has no order yet: it computes it to find its place
    t = time.perf_counter()
    stream.samples(0, steps - timed)
    out["resume_lookup_s"] = time.perf_counter() - t
    end = batches(steps - timed)
    out["batch_end_median_s"] = float(np.median(end[1:]))
    stream.close()
    out.update(samples=data.num_samples, steps_per_epoch=steps, row_groups=len(data.groups),
               shards=len(data.data.manifest.shards), rss_end_mib=_rss_mib(),
               peak_rss_mib=peak_rss_mib())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, nargs="+", default=[58_000, 580_000, 5_800_000])
    ap.add_argument("--batch", type=int, default=512, help="global batch (two workers share it)")
    ap.add_argument("--timed", type=int, default=20, help="batches timed at the start and at the end")
    ap.add_argument("--work", default="", help="folder for the datasets (default: a temporary one)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: measure this dataset, print JSON
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.one:
        report(measure(args.one, args.batch, args.timed))
        return
    from benchmarks.synthetic_refined import write_synthetic_refined

    rows = []
    for faces in args.faces:
        work = Path(tempfile.mkdtemp(prefix="data-scale-", dir=args.work or None))
        try:
            t = time.perf_counter()
            write_synthetic_refined(str(work / "data"), identities=faces // FACES_PER_IDENTITY,
                                    images_per_identity=FACES_PER_IDENTITY, distinct_images=2000, threads=2)
            written = time.perf_counter() - t
            size = sum(f.stat().st_size for f in (work / "data").rglob("*") if f.is_file())
            row = {"faces": faces, "identities": faces // FACES_PER_IDENTITY, "write_s": written, "bytes": size,
                   **measure_in_process([__file__, "--one", str(work / "data"), "--batch", str(args.batch),
                                         "--timed", str(args.timed)])}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        print(row, flush=True)
    growth = growth_exponents([r for r in rows if "open_s" in r], "faces",
                              ["open_s", "rss_after_open_mib", "peak_rss_mib", "resume_lookup_s", "batch_end_median_s"])
    command = "python benchmarks/bench_data_scale.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "batch": args.batch, "growth_exponent": growth}
    out = Path(args.out)
    (out / "data_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = ["# The training data path as the dataset grows (one worker of two, CPU preparation)", "",
          f"`{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['cpus']} cpus); global batch "
          f"{args.batch} (256 per worker), {FACES_PER_IDENTITY} faces per identity, shards of 20,000 rows in row "
          "groups of 1,000, on local disk. Times in seconds, memory in MiB (resident).", "",
          "| faces | identities | GB on disk | open s | RSS after open | epoch order s | first batch s "
          "| batch at start s | batch at end s | resume lookup s | peak RSS |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "open_s" not in r:
            md.append(f"| {r['faces']:,} | {r['identities']:,} | {r['failed']} |" + " |" * 8)
            continue
        md.append(f"| {r['faces']:,} | {r['identities']:,} | {r['bytes'] / 1e9:.1f} | {r['open_s']:.2f} "
                  f"| {r['rss_after_open_mib']:.0f} | {r['epoch_order_s']:.2f} | {r['first_batch_s']:.3f} "
                  f"| {r['batch_start_median_s']:.3f} | {r['batch_end_median_s']:.3f} | {r['resume_lookup_s']:.2f} "
                  f"| {r['peak_rss_mib']:.0f} |")
    if growth:
        md += ["", f"Growth exponents (quantity ~ faces^k) from {growth['from']:,} to {growth['to']:,} faces: "
               + ", ".join(f"{k} {v:.2f}" for k, v in growth.items() if k not in ("from", "to")) + "."]
    (out / "data_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

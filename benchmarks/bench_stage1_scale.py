"""Stage 1 as the input grows to MS-Celeb size: time, throughput per core and peak memory of
the driver and of the workers, and what the driver keeps (manifest, identity map).

Usage (writes benchmarks/results/stage1_scale.{json,md}):
    .venv/bin/python benchmarks/bench_stage1_scale.py [--records 10000 100000 1000000] [--work /tmp]

Input: insightface RecordIO (train.rec/.idx with its header and identity records: the format
MS1M ships in), 68 pre-aligned 112x112 faces per identity, JPEG bytes drawn from a pool of
4,000 synthetic faces, each from its own random field (benchmarks/synthetic_refined.py) so that writing 1M records
takes a minute; no identity holds the same bytes twice. Each size runs `run_stage1` in a
fresh process on a local Dask cluster of `--workers` single-threaded workers (the default
config otherwise: 2,000 records per partition). Peak memory: the driver's from the OS, each
worker's as stage 1 records it (`worker_peak_rss_mib` in the manifest).
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


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.stage1 import peak_rss_mib  # noqa: E402
from benchmarks.scaling import growth_exponents, measure_in_process, report  # noqa: E402

FACES_PER_IDENTITY = 68
POOL = 4000


def write_input(dest: Path, records: int) -> None:
    from benchmarks.synthetic_refined import _identity_faces
    from cleaning.formats.recordio import write_rec

    pool = [_identity_faces(0, n, 1)[0][0] for n in range(POOL)]  # each from its own field: no near duplicates
    write_rec(str(dest) + "/", ((n // FACES_PER_IDENTITY, pool[n % POOL]) for n in range(records)))


def run_one(input_dir: str, out_dir: str, workers: int) -> dict:
    from dataset import RefinedDataset
    from pipelines.stage1_dask import CleanConfig, run_stage1

    cfg = CleanConfig(workers=workers)
    t = time.perf_counter()
    out = run_stage1(input_dir, "insightface-rec", RefinedDataset.create(out_dir), cfg)
    seconds = time.perf_counter() - t
    m = out.manifest.to_dict()
    manifest_bytes = os.path.getsize(os.path.join(out_dir, "manifest.json"))
    return {"seconds": seconds, "read": m["counts"]["read"], "kept": m["counts"]["kept"],
            "rejected_by_reason": m["counts"]["by_reason"], "identities": m["num_classes"],
            "partitions": len(m["shards"]), "worker_peak_rss_mib": m["worker_peak_rss_mib"],
            "manifest_bytes": manifest_bytes,
            "driver_peak_rss_mib": peak_rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default="", help="folder for input and output (default: a temporary one)")
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: INPUT OUT
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.one:
        report(run_one(args.one[0], args.one[1], args.workers))
        return
    rows = []
    for records in args.records:
        work = Path(tempfile.mkdtemp(prefix="stage1-scale-", dir=args.work or None))
        try:
            t = time.perf_counter()
            write_input(work / "rec", records)
            written = time.perf_counter() - t
            row = {"records": records, "write_input_s": written,
                   **measure_in_process([__file__, "--one", str(work / "rec"), str(work / "out"),
                                         "--workers", str(args.workers)])}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if "seconds" in row:
            row["records_per_s_per_core"] = row["read"] / row["seconds"] / args.workers
        rows.append(row)
        print(row, flush=True)
    growth = growth_exponents([r for r in rows if "seconds" in r], "records",
                              ["seconds", "driver_peak_rss_mib", "worker_peak_rss_mib", "manifest_bytes"])
    command = "python benchmarks/bench_stage1_scale.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "workers": args.workers, "growth_exponent": growth}
    out = Path(args.out)
    (out / "stage1_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = ["# Stage 1 as the input grows (insightface RecordIO, local Dask cluster)", "",
          f"`{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['cpus']} cpus); {args.workers} "
          f"single-threaded workers, {FACES_PER_IDENTITY} pre-aligned faces per identity, default stage-1 config.", "",
          "| records | identities kept | partitions | seconds | records/s per core | driver peak MiB "
          "| worker peak MiB | manifest KB | kept | rejected (reasons) |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "seconds" not in r:
            md.append(f"| {r['records']:,} | {r['failed']} |" + " |" * 8)
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in r["rejected_by_reason"].items()) or "-"
        md.append(f"| {r['records']:,} | {r['identities']:,} | {r['partitions']} | {r['seconds']:.0f} "
                  f"| {r['records_per_s_per_core']:.0f} | {r['driver_peak_rss_mib']:.0f} "
                  f"| {r['worker_peak_rss_mib']:.0f} | {r['manifest_bytes'] / 1024:.0f} | {r['kept']:,} | {reasons} |")
    if growth:
        md += ["", f"Growth exponents (quantity ~ records^k) from {growth['from']:,} to {growth['to']:,} records: "
               + ", ".join(f"{k} {v:.2f}" for k, v in growth.items() if k not in ("from", "to")) + "."]
    (out / "stage1_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

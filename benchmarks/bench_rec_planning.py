"""Planning an insightface RecordIO input (stage 1's driver side) in both record orders:
time and the driver's peak memory (VmHWM) to plan train.idx into partitions of whole
identities, in index order (header, images, identity records: our writer, im2rec) and in
face2rec2's order (images 1..N, then record 0 and the identity records, as insightface's
face2rec2.py writes MS1M's train.idx), beside the in-memory planner that face2rec2's order
fell back to before the streamed planner read it.

Usage (writes benchmarks/results/rec_planning.{json,md}):
    .venv/bin/python benchmarks/bench_rec_planning.py [--records 100000 1000000] [--work /tmp]

Input: train.rec/.idx/property written by cleaning/formats/recordio.write_rec in each order,
68 records per identity (MS1MV2's mean), 64-byte payloads: planning reads train.idx, record 0
and the identity records, never an image's bytes, so the payload size does not change what is
measured. Each plan runs in a fresh process (benchmarks/scaling.py), `--repeat` times: the
time is the fastest run's (the machine is shared), the peak the largest VmHWM, reported beside
the VmHWM after the imports (the interpreter, NumPy, pyarrow) so the plan's own share is the
difference. The partitions are checked equal across
orders: the same image indices in each partition, from the index lines each byte range holds.
"""

from __future__ import annotations

import argparse
import hashlib
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
from benchmarks.scaling import growth_exponents, measure_in_process, report  # noqa: E402

FACES_PER_IDENTITY = 68
PAYLOAD_BYTES = 64
RECORDS_PER_PARTITION = 2000  # stage 1's default (clean.records_per_partition)
PLANNERS = {"streamed": "the planner stage 1 runs (plan_insightface_rec)",
            "in_memory": "the in-memory planner (the fallback for a scrambled index)"}


def write_input(dest: Path, records: int, order: str) -> None:
    from cleaning.formats.recordio import write_rec

    payloads = [bytes([n % 251]) * PAYLOAD_BYTES for n in range(251)]
    write_rec(str(dest) + "/", ((n // FACES_PER_IDENTITY, payloads[n % 251]) for n in range(records)), order=order)


def partition_digest(parts) -> str:
    """A digest of the image indices each partition's byte range of train.idx lists (read
    after the measurement: the worker's side, done here only to compare the orders)."""
    from cleaning.readers import _rec_entries

    h = hashlib.sha256()
    for part in parts:
        keys = [e[0] for e in _rec_entries(part) if len(e) == 3]
        h.update(f"{part.index}:{len(keys)}:{keys[:1]}:{keys[-1:]}:{hashlib.sha256(str(keys).encode()).hexdigest()}\n".encode())
    return h.hexdigest()


def run_one(root: str, planner: str) -> dict:
    import logging

    from cleaning import readers
    from cleaning.stage1 import peak_rss_mib
    from dataset import storage

    logging.basicConfig(level=logging.WARNING)
    baseline = peak_rss_mib()
    t = time.perf_counter()
    if planner == "streamed":
        parts = readers.plan("insightface-rec", root, RECORDS_PER_PARTITION)
    else:
        with storage.open_input(storage.join(root, "train.rec")) as fh:
            parts = readers._plan_rec_in_memory(root, storage.join(root, "train.idx"), fh, RECORDS_PER_PARTITION)
    seconds = time.perf_counter() - t
    peak = peak_rss_mib()
    return {"seconds": seconds, "driver_peak_rss_mib": peak, "after_imports_mib": baseline,
            "plan_mib": peak - baseline, "partitions": len(parts),
            "byte_ranges": all("byte_range" in p.detail and "records" not in p.detail for p in parts),
            "digest": partition_digest(parts) if planner == "streamed" else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per plan (fastest time, largest peak)")
    ap.add_argument("--work", default="", help="folder for the inputs (default: a temporary one)")
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: ROOT PLANNER
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.one:
        report(run_one(*args.one))
        return
    rows = []
    for records in args.records:
        work = Path(tempfile.mkdtemp(prefix="rec-planning-", dir=args.work or None))
        try:
            for order in ("index", "face2rec2"):
                t = time.perf_counter()
                write_input(work / order, records, order)
                written = time.perf_counter() - t
                for planner in (["streamed", "in_memory"] if order == "face2rec2" else ["streamed"]):
                    runs = [measure_in_process([__file__, "--one", str(work / order), planner])
                            for _ in range(args.repeat)]
                    done = [r for r in runs if "seconds" in r]
                    measured = dict(runs[0]) if not done else {
                        **done[0], "seconds": min(r["seconds"] for r in done), "seconds_all": [r["seconds"] for r in done],
                        **{k: max(r[k] for r in done) for k in ("driver_peak_rss_mib", "after_imports_mib", "plan_mib")}}
                    if len({r.get("digest") for r in done}) > 1:
                        raise SystemExit(f"{records} {order} {planner}: two runs planned differently")
                    row = {"records": records, "order": order, "planner": planner, "write_input_s": written,
                           "idx_bytes": os.path.getsize(work / order / "train.idx"), **measured}
                    rows.append(row)
                    print(row, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        same = {r["digest"] for r in rows if r["records"] == records and r.get("digest")}
        if len(same) != 1:
            raise SystemExit(f"{records} records: the orders' streamed plans differ ({len(same)} digests)")
    growth = {}
    for order, planner in (("index", "streamed"), ("face2rec2", "streamed"), ("face2rec2", "in_memory")):
        picked = [r for r in rows if r["order"] == order and r["planner"] == planner and "seconds" in r]
        growth[f"{order}/{planner}"] = growth_exponents(picked, "records", ["seconds", "plan_mib"])
    command = "python benchmarks/bench_rec_planning.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "records_per_partition": RECORDS_PER_PARTITION,
            "faces_per_identity": FACES_PER_IDENTITY, "repeat": args.repeat, "growth_exponent": growth}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rec_planning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = ["# Planning insightface RecordIO in index order and in face2rec2's order (driver side of stage 1)", "",
          f"`{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['cpus']} cpus); "
          f"{FACES_PER_IDENTITY} records per identity, {RECORDS_PER_PARTITION:,} records per partition. "
          f"Each plan in {args.repeat} fresh processes: the fastest time, the largest peak (VmHWM), of which "
          "the imports take the 'after imports' figure. The streamed plans of both orders list the same image indices in each partition.", "",
          "| records | train.idx order | planner | seconds | driver peak MiB | after imports MiB "
          "| plan's own MiB | plan's own B per record | partitions | byte ranges only |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "seconds" not in r:
            md.append(f"| {r['records']:,} | {r['order']} | {r['planner']} | {r['failed']} |" + " |" * 6)
            continue
        md.append(f"| {r['records']:,} | {r['order']} | {r['planner']} | {r['seconds']:.2f} "
                  f"| {r['driver_peak_rss_mib']} | {r['after_imports_mib']} | {r['plan_mib']} "
                  f"| {r['plan_mib'] * 2**20 / r['records']:.0f} | {r['partitions']} "
                  f"| {'yes' if r['byte_ranges'] else 'no: one entry per record'} |")
    lines = [f"{k}: " + ", ".join(f"{q} {v:.2f}" for q, v in g.items() if q not in ("from", "to"))
             for k, g in growth.items() if g]
    if lines:
        first = next(g for g in growth.values() if g)
        md += ["", f"Growth exponents (quantity ~ records^k) from {first['from']:,} to {first['to']:,} records: "
               + "; ".join(lines) + "."]
    md += ["", "Planners: " + "; ".join(f"{k}: {v}" for k, v in PLANNERS.items()) + ". Before the streamed planner "
           "read face2rec2's order, such an index went to the in-memory planner (the last row of each size)."]
    (out / "rec_planning.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

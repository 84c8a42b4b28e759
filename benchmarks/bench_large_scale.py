"""All-to-all verification at scale (pipelines/large_scale.py): time, pair throughput and
peak memory per process, for N synthetic 512-d features with W Ray workers on this machine,
the growth exponents, and the extrapolation to Trillion-Pairs (1.58M images, ~1.25e12 pairs).

Each (N, W) runs in a fresh process: it writes the features as .npy shards of `--block`
rows (then restarts its VmHWM, so the generator's size is not counted), starts a local Ray
with W CPUs, and runs `verify` with one CPU (one torch thread) per task: one task per
block pair i <= j, each reading its two blocks and returning the block's genuine scores and
impostor top-k. The FARs asked (default 1e-6 and 1e-5) keep every order statistic within
the top-k limit at these sizes, so it is one pass; a FAR whose k exceeds the limit adds the
second (radix) pass, about doubling the time. Throughput: pairs scored / wall seconds of
`verify`, per worker = / W. The per-core float32 matmul rate of this machine is measured
alongside (one thread, 4096x512 by 512x4096), so the engine's share of the matmul bound is
in the table.

    python benchmarks/bench_large_scale.py --sizes 10000 100000 300000 --workers 1 2
"""

from __future__ import annotations

import argparse
import datetime
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_large_scale_memory import Sampler  # noqa: E402
from scaling import growth_exponents, measure_in_process, report  # noqa: E402

TRILLION_PAIRS_IMAGES = 1_580_000
# H100 SXM5 dense float32 (no tensor cores; torch's default for float32 matmul) 67 TFLOPS, TF32
# tensor cores 494.7 TFLOPS dense: NVIDIA H100 Tensor Core GPU datasheet. A score costs 2 x 512 flops.
H100_FP32_FLOPS = 67e12
H100_TF32_FLOPS = 494.7e12


def matmul_pairs_per_second(dim: int = 512, threads: int = 1) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.nn.functional.normalize(torch.randn(4096, dim), dim=1)
    a @ a.T
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ a.T
    return reps * 4096 * 4096 / (time.perf_counter() - start)


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_one(n: int, workers: int, block: int, dim: int, fars: list[float], work: Path) -> dict:
    import psutil
    import ray

    from cleaning.stage1 import peak_rss_mib
    from pipelines import large_scale as ls

    rng = np.random.default_rng(n)
    per_identity = 10  # genuine pairs: 45 per identity
    for start in range(0, n, block):  # generated shard by shard: the driver never holds N features
        rows = min(block, n - start)
        labels = np.arange(start, start + rows) // per_identity
        ls.write_features(str(work), rng.standard_normal((rows, dim), dtype=np.float32), labels, shard_rows=block,
                          fmt="npy", first_shard=start // block)
    _reset_peak_rss()
    fs = ls.open_features(str(work), block)
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        stats = ls.EngineStats()
        start = time.perf_counter()
        with Sampler() as sampler:  # the driver's heap apart from the object-store pages it maps
            result = ls.verify([ls.PairSpace(fs)], fars, runner=ls.RayRunner(cpus=1), stats=stats)
        seconds = time.perf_counter() - start
        workers_peak = max((peak_rss_mib(c.pid) for c in psutil.Process().children(recursive=True)), default=0)
    finally:
        ray.shutdown()
    return {"n": n, "workers": workers, "block": block, "pairs": stats.pairs, "tasks": stats.tasks,
            "passes": stats.passes, "seconds": round(seconds, 2), "pairs_per_s": stats.pairs / seconds,
            "pairs_per_s_per_worker": stats.pairs / seconds / workers, "driver_peak_mib": peak_rss_mib(),
            "driver_anon_peak_mib": round(sampler.peak["RssAnon"]),
            "driver_shmem_peak_mib": round(sampler.peak["RssShmem"]),
            "object_store_peak_mib": sampler.store_peak[0],
            "worker_peak_mib": workers_peak, "impostors": result.impostors, "genuine": result.genuine,
            "tar": {f"{k:g}": v for k, v in result.tar.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--block", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--far", type=float, nargs="+", default=[1e-6, 1e-5])
    ap.add_argument("--work", default="", help="folder for the shards (default: a temporary one)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, one worker count
    ap.add_argument("--one-workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="large_scale_cpu")
    args = ap.parse_args()
    if args.one:
        report(run_one(args.one, args.one_workers, args.block, args.dim, args.far, Path(args.work)))
        return
    matmul = matmul_pairs_per_second(args.dim)
    rows = []
    for n in args.sizes:
        for w in args.workers:
            work = Path(tempfile.mkdtemp(prefix="large-scale-", dir=args.work or None))
            try:
                rows.append(measure_in_process([__file__, "--one", str(n), "--one-workers", str(w), "--block",
                                                str(args.block), "--dim", str(args.dim), "--work", str(work),
                                                "--far", *map(str, args.far)]))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            rows[-1].setdefault("n", n)
            rows[-1].setdefault("workers", w)
            print(json.dumps(rows[-1]), flush=True)
    ok = [r for r in rows if "failed" not in r]
    growth = {w: growth_exponents([r for r in ok if r["workers"] == w], "n",
                                  ["seconds", "driver_peak_mib", "worker_peak_mib"]) for w in args.workers}
    trillion_pairs = TRILLION_PAIRS_IMAGES * (TRILLION_PAIRS_IMAGES - 1) // 2
    largest = max((r["n"] for r in ok), default=0)
    rate = max((r["pairs_per_s_per_worker"] for r in ok if r["n"] == largest), default=0.0)
    gpu_fp32 = H100_FP32_FLOPS / (2 * args.dim)
    gpu_tf32 = H100_TF32_FLOPS / (2 * args.dim)
    summary = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
               "cpus": os.cpu_count(), "command": "python benchmarks/bench_large_scale.py " + " ".join(sys.argv[1:]),
               "matmul_pairs_per_s_one_thread": matmul, "rows": rows, "growth": growth,
               "trillion_pairs": trillion_pairs, "cpu_pairs_per_s_per_worker": rate,
               "cpu_hours_one_worker": trillion_pairs / rate / 3600 if rate else None,
               "h100_fp32_matmul_bound_s": trillion_pairs / gpu_fp32, "h100_tf32_matmul_bound_s": trillion_pairs / gpu_tf32}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(summary, args))
    print((out / f"{args.name}.md").read_text())


def markdown(s: dict, args) -> str:
    lines = [f"# All-to-all verification at scale (synthetic {args.dim}-d features)", "",
             f"`{s['command']}` on {s['date']} ({s['machine']}, {s['cpus']} cpus, shared with other work). "
             f"Blocks of {args.block} rows as .npy shards on local disk; one Ray task per block pair (i <= j), one "
             f"CPU and one torch thread each; FARs {', '.join(f'{f:g}' for f in args.far)} (one pass: every order "
             "statistic within the top-k limit). Peak RSS is VmHWM: the driver's after the features were written, "
             "and the largest of any Ray process. VmHWM counts the pages of Ray's object store a process has "
             "mapped (results are read zero-copy), so the driver's own memory is given apart: its RssAnon (heap) "
             "and RssShmem (object-store pages) peaks, sampled every 20 ms, and the most the store held "
             "(benchmarks/bench_large_scale_memory.py).", "",
             "| N | workers | pairs | tasks | seconds | pairs/s | pairs/s/worker | driver peak MiB | "
             "driver heap / store pages MiB | store peak MiB | worker peak MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        if "failed" in r:
            lines.append(f"| {r['n']:,} | {r['workers']} | failed: {r['failed'][:120]} | | | | | | | | |")
            continue
        split = (f"{r['driver_anon_peak_mib']} / {r['driver_shmem_peak_mib']} | {r['object_store_peak_mib']:.0f}"
                 if "driver_anon_peak_mib" in r else "not measured | not measured")
        lines.append(f"| {r['n']:,} | {r['workers']} | {r['pairs']:.3g} | {r['tasks']} | {r['seconds']:.1f} | "
                     f"{r['pairs_per_s']:.3g} | {r['pairs_per_s_per_worker']:.3g} | {r['driver_peak_mib']} | "
                     f"{split} | {r['worker_peak_mib']} |")
    lines += ["", f"This machine's one-thread float32 matmul (4096x512 by 512x4096): "
                  f"{s['matmul_pairs_per_s_one_thread']:.3g} scores/s.", ""]
    for w, g in s["growth"].items():
        if g:
            lines.append(f"Growth exponents, {w} worker(s), N {g['from']:,} to {g['to']:,} (pairs grow as N^2): "
                         f"time {g['seconds']:.2f} (vs pairs {g['seconds'] / 2:.2f}; Ray's start-up weighs on the smallest N), "
                         f"driver peak {g['driver_peak_mib']:.2f}, "
                         f"worker peak {g['worker_peak_mib']:.2f}.")
    rate = s["cpu_pairs_per_s_per_worker"]
    lines += ["", "## Extrapolation to Trillion-Pairs (1.58M images)", "",
              f"{s['trillion_pairs']:.4g} pairs. At this machine's measured {rate:.3g} pairs/s per worker (the largest "
              f"N): {s['cpu_hours_one_worker']:.0f} worker-hours for one pass, e.g. "
              f"{s['cpu_hours_one_worker'] / 64:.1f} h on 64 such workers (time is linear in pairs: see the exponents)."
              if rate else "no measurement", "",
              f"H100 (SXM5), matmul-bound: {H100_FP32_FLOPS / 1e12:.0f} TFLOPS dense float32 (torch's default for "
              f"float32 matmul) gives {H100_FP32_FLOPS / 1024:.3g} scores/s, {s['h100_fp32_matmul_bound_s']:.0f} s "
              f"for all pairs; with TF32 tensor cores ({H100_TF32_FLOPS / 1e12:.1f} TFLOPS dense) "
              f"{s['h100_tf32_matmul_bound_s']:.1f} s. Source of the rates: NVIDIA's H100 Tensor Core GPU datasheet. "
              "These are bounds, not measurements: no GPU was lent to this run; the masking and top-k of each tile "
              "read and write each score a few times (memory-bound at ~3.35 TB/s HBM3), so expect a few times the "
              "bound. A FAR whose k exceeds the top-k limit (FAR 1e-6 over 1.25e12 pairs is k = 1.25e6, within the "
              "2e6 limit) adds a second pass.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""What the verification driver's memory is (pipelines/large_scale.py `verify` on Ray).

VmHWM (the peak resident set) counts every page the process has mapped and touched: its
own heap (RssAnon) but also shared pages (RssShmem: Ray's object store, which `ray.get`
maps zero-copy) and file pages (RssFile: libraries). This benchmark samples the driver's
/proc/self/status every 20 ms while `verify` runs, so each kind's peak is reported on its
own beside VmHWM, with the most Ray's object store held (asked every second), and the
driver's heap once the result is dropped, before and after glibc's malloc_trim (free heap
the allocator keeps vs memory still in use).

Each run is a fresh process: it writes N synthetic 512-d features as .npy shards of
`--block` rows, resets its VmHWM once a local Ray with W CPUs is up, and runs `verify` on one
all-to-all pair space. A FAR like 1e-3 makes k (= FAR x impostor pairs + 1, the impostor
scores each task returns) large, so what the driver keeps per result shows in a few minutes.
`--replay` scores nothing: each block task returns a result of the size the real one would,
through the engine's own `verify` and `RayRunner`, so the driver's side of a long run (N =
300,000: 703 results of 1.7 MB) is measured in a minute. `--engine-root` runs another
version of the engine (a `git archive` of an earlier commit) for a before/after:

    python benchmarks/bench_large_scale_memory.py --n 50000 --block 4096 --far 1e-3
    git archive <commit> arcface_core pipelines dataset cleaning | tar -x -C /tmp/engine-before
    python benchmarks/bench_large_scale_memory.py --replay --n 300000 --block 8192 --far 1e-6 1e-5 \
        --engine-root /tmp/engine-before --label before --append
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scaling import measure_in_process, report  # noqa: E402

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def status_mib(pid: int | str = "self") -> dict[str, float]:
    """The memory lines of /proc/<pid>/status, MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in FIELDS:
                out[name] = int(value.split()[0]) / 1024
    return out


class Sampler:
    """Peaks of each /proc/self/status memory field, sampled on a thread every `interval` s
    (a peak shorter than the interval can be missed; VmHWM itself is exact), and of what
    Ray's object store holds, asked every `store_interval` s."""

    def __init__(self, interval: float = 0.02, store_interval: float = 1.0):
        self.interval, self.store_interval = interval, store_interval
        self.peak, self.samples, self.store_peak = {}, 0, (0.0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asked = 0.0
        while not self._stop.is_set():
            self.take()
            if time.monotonic() - asked >= self.store_interval:
                self.store_peak = max(self.store_peak, object_store_mib())
                asked = time.monotonic()
            self._stop.wait(self.interval)

    def take(self) -> dict[str, float]:
        now = status_mib()
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0.0), v)
        self.samples += 1
        return now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.take()


def object_store_mib() -> tuple[float, int]:
    """(MiB, objects) Ray's object store holds now, from `ray memory --stats-only`'s summary."""
    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return (float(found.group(1)), int(found.group(2))) if found else (float("nan"), -1)


def reset_peak_rss() -> None:
    """VmHWM back to the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def malloc_trim() -> bool:
    """Hand the C heap's free memory back to the OS (glibc), so what RssAnon keeps after it
    is memory still in use, not memory the allocator holds for reuse."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def rounded(d: dict) -> dict:
    return {k: round(v, 1) for k, v in d.items()}


def replayed_block(left, left_labels, right, right_labels, plan, diagonal, impostors, tile_elements, device,
                   threads):
    """Stands in for the engine's block task in a replay: no features read, no score computed,
    but a result of the very shape the real task returns for this block pair (its genuine
    pair count of genuine scores, its impostor count, a descending top-k of plan.top_k
    scores), so the driver receives and merges what it would at this N."""
    import torch

    from arcface_core import large_scale as core

    genuine, impostor = (core.pair_counts(left_labels) if diagonal else core.pair_counts(left_labels, right_labels))
    rng = np.random.default_rng(int(left.start) * 1_000_003 + int(right.start))
    scores = np.sort(rng.standard_normal(min(plan.top_k, impostor)).astype(np.float32))[::-1].copy()
    return core.VerificationPartial(genuine=[rng.standard_normal(genuine).astype(np.float32)], impostors=impostor,
                                    top=torch.from_numpy(scores))


def replay_features(n: int, block: int):
    """Labels only (ten images an identity), in blocks of `block`: what `verify` plans from."""
    from pipelines import large_scale as ls

    labels = np.arange(n) // 10
    blocks = [ls.FeatureBlock(None, s, min(s + block, n)) for s in range(0, n, block)]
    return ls.FeatureSet(blocks, labels.astype(np.int64), 512)


def run_one(n: int, workers: int, block: int, dim: int, fars: list[float], work: Path, replay: bool = False) -> dict:
    import ray

    from pipelines import large_scale as ls

    if replay:
        fs = replay_features(n, block)
    else:
        rng = np.random.default_rng(n)
        for start in range(0, n, block):  # shard by shard: the driver never holds N features
            rows = min(block, n - start)
            ls.write_features(str(work), rng.standard_normal((rows, dim), dtype=np.float32),
                              np.arange(start, start + rows) // 10, shard_rows=block, fmt="npy",
                              first_shard=start // block)
        fs = ls.open_features(str(work), block)
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    runner = ls.RayRunner(cpus=1)
    if replay:  # the engine's own runner and verify, with the block task replaced
        map_blocks = runner.map
        runner.map = lambda fn, jobs: map_blocks(replayed_block, jobs)
    try:
        gc.collect()
        reset_peak_rss()
        before = status_mib()
        impostors = ls.PairSpace(fs).counts()[1]
        stats = ls.EngineStats()
        start = time.perf_counter()
        with Sampler() as sampler:
            result = ls.verify([ls.PairSpace(fs)], fars, runner=runner, stats=stats)
        seconds = time.perf_counter() - start
        store_mib, store_objects = object_store_mib()
        after = status_mib()
        tar = {} if replay else {f"{k:g}": v for k, v in result.tar.items()}
        del result
        gc.collect()
        store_released_mib, store_released_objects = object_store_mib()
        released = status_mib()
        trimmed = status_mib() if malloc_trim() else {}
    finally:
        ray.shutdown()
    top_k = max(min(ls.core.allowed_false_accepts(f, impostors) + 1, impostors) for f in fars)
    return {"engine_file": ls.__file__, "n": n, "workers": workers, "block": block, "fars": fars, "replay": replay,
            "tasks": stats.tasks, "top_k": top_k,
            "top_k_mib": round(top_k * 4 / 2**20, 2), "seconds": round(seconds, 1), "tar": tar,
            "before": rounded(before), "peak": rounded(sampler.peak), "after": rounded(after),
            "released": rounded(released), "trimmed": rounded(trimmed), "samples": sampler.samples,
            "object_store_peak_mib": sampler.store_peak[0], "object_store_peak_objects": sampler.store_peak[1],
            "object_store_mib": store_mib, "object_store_objects": store_objects,
            "object_store_released_mib": store_released_mib, "object_store_released_objects": store_released_objects}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pipelines/large_scale.py",
                                "arcface_core/large_scale.py"], cwd=ROOT, capture_output=True, text=True,
                             check=False).stdout
        return sha.strip() + (" (engine files modified)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[50_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--far", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--work", default="", help="folder for the shards (default: a temporary one)")
    ap.add_argument("--replay", action="store_true",
                    help="no features and no scoring: each block task returns a result of the size the real one "
                         "would (genuine scores, impostor count, top-k), through the engine's own verify and runner")
    ap.add_argument("--engine-root", default="",
                    help="import the engine from this tree instead (e.g. `git archive <commit> | tar -x -C DIR`)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in this process
    ap.add_argument("--label", default="", help="what this run measures (e.g. the engine's commit), for the table")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="large_scale_memory")
    ap.add_argument("--append", action="store_true", help="add the rows to the existing results instead of replacing")
    args = ap.parse_args()
    if args.engine_root:  # before ROOT for this process, and for Ray's workers through PYTHONPATH
        sys.path.insert(0, str(Path(args.engine_root).resolve()))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.engine_root).resolve()),
                                                                  os.environ.get("PYTHONPATH", "")]))
    if args.one:
        report(run_one(args.one, args.workers, args.block, args.dim, args.far, Path(args.work), args.replay))
        return
    command = "python benchmarks/bench_large_scale_memory.py " + shlex.join(sys.argv[1:])
    rows = []
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix="large-scale-memory-", dir=args.work or None))
        try:
            row = measure_in_process([__file__, "--one", str(n), "--workers", str(args.workers), "--block",
                                      str(args.block), "--dim", str(args.dim), "--work", str(work),
                                      "--far", *map(str, args.far), *(["--replay"] if args.replay else []),
                                      *(["--engine-root", args.engine_root] if args.engine_root else [])])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row.update({"n": n, "engine": f"tree {args.engine_root}" if args.engine_root else git_commit(),
                    "label": args.label, "command": command,
                    "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")})
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    notes = []  # what the rows show, written by whoever reads them; kept when rows are appended
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        rows, notes = previous["rows"] + rows, previous.get("notes", [])
    summary = {"machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows, "notes": notes}
    path.write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(summary))
    print((out / f"{args.name}.md").read_text())


def markdown(s: dict) -> str:
    lines = ["# The verification driver's memory", "",
             f"`benchmarks/bench_large_scale_memory.py` ({s['machine']}, {s['cpus']} cpus, shared with other work), "
             "2 Ray workers, one CPU each. The driver's /proc/self/status is sampled every 20 ms while `verify` runs "
             "(MiB; VmHWM reset once Ray is up): RssAnon is the driver's own memory (heap: torch tensors, numpy "
             "arrays, Python objects); RssShmem is Ray's object store mapped into the driver, touched when `ray.get` "
             "reads a result (numpy arrays in a result stay zero-copy views of the store); VmHWM, the peak RSS other "
             "benchmarks report, counts both. 'store peak' is the most Ray's object store held (asked every second). "
             "'after drop': RssAnon once `verify` has returned and its result is dropped; 'after trim': the same "
             "after glibc's malloc_trim(0), i.e. without the free heap glibc keeps for reuse.", "",
             "| # | engine | run | N | block | FAR | tasks | k (MiB) | s | VmHWM peak | RssShmem peak | "
             "store peak (objects) | RssAnon start / peak | RssAnon after drop | after trim |",
             "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(s["rows"], 1):
        if "failed" in r:
            lines.append(f"| {i} | {r['engine']} {r['label']} | | {r['n']:,} | failed: {r['failed'][:150]} |")
            continue
        p, b = r["peak"], r["before"]
        lines.append(f"| {i} | {r['engine']}: {r['label']} | {'replay' if r.get('replay') else 'scored'} | "
                     f"{r['n']:,} | {r['block']} | "
                     f"{', '.join(f'{f:g}' for f in r['fars'])} | {r['tasks']} | {r['top_k']:,} ({r['top_k_mib']}) | "
                     f"{r['seconds']} | {p['VmHWM']:.0f} | {p['RssShmem']:.0f} | {r['object_store_peak_mib']:.0f} "
                     f"({r['object_store_peak_objects']}) | {b['RssAnon']:.0f} / {p['RssAnon']:.0f} | "
                     f"{r['released']['RssAnon']:.0f} | {r['trimmed'].get('RssAnon', float('nan')):.0f} |")
    for note in s.get("notes", []):
        lines += ["", note]
    lines += ["", "Commands, by row:", ""]
    lines += [f"{i}. `{r.get('command', '')}` ({r.get('date', '')})" for i, r in enumerate(s["rows"], 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

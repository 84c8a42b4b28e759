"""Step time and peak memory of the sharded classification layer (forward + backward).

Usage (writes benchmarks/results/classification_layer_<device>.{json,md}):
    .venv/bin/python benchmarks/bench_classification_layer.py [--classes 10000 100000 1000000]
        [--worlds 1 2] [--rates 1.0 0.1] [--batch 128] [--dim 512] [--steps 3]

Each configuration runs in fresh processes (gloo on CPU, one per rank) so peak memory is
that configuration's own: peak RSS growth per rank on CPU, torch.cuda.max_memory_allocated
on GPU. The baseline for ratios is world size 1 with sampling off at the same class count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arcface_core.classifier import ShardedMarginClassifier  # noqa: E402
from arcface_core.margins import ArcFace  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(rank, world, port, classes, rate, batch, dim, steps, device, out_dir):
    torch.set_num_threads(max(1, os.cpu_count() // world))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    base_rss = _rss_mb()
    layer = ShardedMarginClassifier(classes, dim, ArcFace(), sample_rate=rate).to(dev)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator(device=dev).manual_seed(rank)
    local = batch // world
    times = []
    for step in range(steps + 1):  # the first step warms up and is not timed
        emb = torch.randn(local, dim, device=dev, generator=g, requires_grad=True)
        labels = torch.randint(0, classes, (local,), device=dev, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        loss = layer(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20) if device == "cuda" else _rss_mb() - base_rss
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"times": times, "peak_mb": peak, "loss": float(loss.detach())}))
    dist.destroy_process_group()


def run_config(classes, world, rate, batch, dim, steps, device):
    with tempfile.TemporaryDirectory() as out_dir, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.start_processes(_worker, args=(world, port, classes, rate, batch, dim, steps, device, out_dir),
                           nprocs=world, join=True, start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world)]
    step_s = statistics.median(max(r["times"][i] for r in ranks) for i in range(steps))
    return {"classes": classes, "world": world, "sample_rate": rate, "batch": batch, "dim": dim,
            "step_ms": round(step_s * 1000, 2), "samples_per_s": round(batch / step_s, 1),
            "peak_mb_per_rank": round(max(r["peak_mb"] for r in ranks), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    for classes in args.classes:
        for world in args.worlds:
            for rate in args.rates:
                row = run_config(classes, world, rate, args.batch, args.dim, args.steps, args.device)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for row in rows:  # ratio against world 1, no sampling, same class count (same invocation)
        base = next(r for r in rows if r["classes"] == row["classes"] and r["world"] == 1 and r["sample_rate"] == 1.0)
        row["speedup_vs_w1_full"] = round(base["step_ms"] / row["step_ms"], 2)
        row["memory_vs_w1_full"] = round(row["peak_mb_per_rank"] / max(base["peak_mb_per_rank"], 1e-9), 2)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"classification_layer_{args.device}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Sharded classification layer, {meta['device']}", "", f"`{meta['command']}` on {meta['date']} "
             f"({meta['machine']}, torch {meta['torch']}). Forward + backward + SGD step, global batch "
             f"{args.batch}, D={args.dim}; peak memory per rank ({'RSS growth' if args.device == 'cpu' else 'CUDA allocated'}).",
             "", "| classes | world | sample rate | step ms | samples/s | peak MB/rank | speed vs w1 full | memory vs w1 full |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['classes']:,} | {r['world']} | {r['sample_rate']} | {r['step_ms']} | {r['samples_per_s']} | "
                     f"{r['peak_mb_per_rank']} | {r['speedup_vs_w1_full']}x | {r['memory_vs_w1_full']}x |")
    (out / f"classification_layer_{args.device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

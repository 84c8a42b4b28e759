"""The training step on CPU workers: what batch-norm over the global batch costs.

Usage (writes benchmarks/results/cpu_step.{json,md}):
    .venv/bin/python benchmarks/bench_cpu_step.py [--backbone tiny-s2 --batch 64 --steps 40]

Runs `Trainee.step` (backbone + DDP + the sharded margin classifier) on random uint8 faces in
1 and 2 gloo processes of one torch thread each, the way `make run`'s two Ray Train workers
share this machine's cores, and reports the global step rate:
  * 1 worker: the baseline, measured in the same invocation;
  * 2 workers, `train.sync_bn = true`: every BatchNorm layer all-reduces its batch statistics
    in the forward and its gradient sums in the backward (exact global-batch normalisation);
  * 2 workers, `train.sync_bn = false`: batch norm per worker, as insightface's arcface_torch
    trains; one gradient all-reduce per step (DDP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.training.config import TrainConfig  # noqa: E402
from pipelines.training.step import Trainee  # noqa: E402

CLASSES = 300


def _worker(rank: int, world: int, sync_bn: bool, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = TrainConfig(backbone=args.backbone, embedding_size=128, batch_size=args.batch, sync_bn=sync_bn)
    trainee = Trainee(cfg, CLASSES, rank, world, torch.device("cpu"))
    share = args.batch // world
    gen = torch.Generator().manual_seed(rank)
    images = torch.randint(0, 255, (share, 112, 112, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, CLASSES, (share,), generator=gen)
    for _ in range(5):  # warm-up: allocator, gloo buffers
        trainee.step(images, labels, 0.01)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        trainee.step(images, labels, 0.01)
    dist.barrier()
    if rank == 0:
        queue.put((time.perf_counter() - started) / args.steps)
    dist.destroy_process_group()


def measure(world: int, sync_bn: bool, port: int, args) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, sync_bn, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    seconds = queue.get(timeout=600)
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tiny-s2")
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the workers)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    cases = [("1 worker (baseline)", 1, False), ("2 workers, sync_bn = true", 2, True),
             ("2 workers, sync_bn = false", 2, False)]
    rows = []
    for n, (name, world, sync_bn) in enumerate(cases):
        seconds = measure(world, sync_bn, 29600 + n, args)
        rows.append({"case": name, "workers": world, "sync_bn": sync_bn, "ms_per_step": 1000 * seconds,
                     "images_per_s": args.batch / seconds})
        print(f"{name:30s} {1000 * seconds:7.1f} ms/step  {args.batch / seconds:7.1f} img/s", flush=True)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_vs_1_worker"] = r["images_per_s"] / base
    command = "python benchmarks/bench_cpu_step.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "backbone": args.backbone, "batch": args.batch, "steps": args.steps,
            "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# The training step on CPU workers: global vs per-worker batch norm", "",
             f"`{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['cpus']} cpus, torch {meta['torch']}); "
             f"{args.backbone}, global batch {args.batch}, {args.steps} timed steps, one torch thread a worker, "
             f"gloo; `Trainee.step` on random uint8 faces, {CLASSES} classes.", "",
             "| case | ms/step | images/s (global) | ratio vs 1 worker |", "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | {r['ratio_vs_1_worker']:.2f}x |"
              for r in rows]
    (out / "cpu_step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""The training step and stage 1's detector on one GPU: one command, JSON lines + a table.

    python benchmarks/bench_gpu.py            # on one H100/H200: at most ~8 minutes
    python benchmarks/bench_gpu.py --smoke    # every code path at tiny sizes, on CPU, < 2 minutes (CI)

Writes benchmarks/results/gpu_step.jsonl (one JSON object per measurement) and gpu_step.md;
a smoke run writes gpu_step_smoke.* to a scratch folder (its figures are no measurement).
What it measures:

1. Our training step (pipelines.training.step.Trainee: uint8 input normalised on the device,
   bf16 autocast, channels_last, fused SGD, the one-buffer margin-softmax node, Partial-FC on
   the device) on synthetic batches, eager and torch.compile'd, against a peer-style step run
   in the same invocation: the structure of insightface arcface_torch's train_v2 step (fp16
   autocast with a loss scaler, NCHW float input already on the device, a normalised copy of
   the centres, the margin applied through arccos under no_grad with boolean indexing, its
   in-place distributed cross entropy, one SGD over backbone and centres). Samples/s is the
   median of the timed steps after warm-up; peak memory is torch's allocator peak.
   Configurations: IResNet-50 batch 512 with 93,431 classes; IResNet-100 batch 128;
   MobileFaceNet batch 512; IResNet-50 batch 256 with 2,000,000 classes at Partial-FC 1.0 and
   0.1. DESIGN.md's anchors (arcface_torch's own step on one H200) are printed beside them.
2. The B x C_r buffers the classification layer allocates per step (forward + backward),
   counted through the dispatcher for our fused node, our composed path and the peer's.
3. From shards: the first configuration end to end from a synthetic refined dataset on local
   disk (written first), through BatchStream (decode threads, pinned uint8 batches).
4. MTCNN detect + align on 512 px photos, batched on the device (photos/s).

A configuration that does not fit the time budget (--budget-s) or the device is reported
as skipped with the reason; nothing is silently left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arcface_core.backbones import build_backbone  # noqa: E402
from pipelines.training.config import ArcFaceParams, MarginConfig, TrainConfig  # noqa: E402
from pipelines.training.step import Trainee  # noqa: E402


@dataclass
class StepCase:
    name: str
    backbone: str
    batch: int
    classes: int
    sample_rate: float = 1.0
    anchor: float | None = None  # arcface_torch's own step on one H200 (DESIGN.md), samples/s


FULL = [  # in priority order: the targets first, so a short budget still measures them
    StepCase("iresnet50 b512 93k", "iresnet50", 512, 93_431, anchor=2480),
    StepCase("iresnet50 b256 2M pfc0.1", "iresnet50", 256, 2_000_000, 0.1, anchor=1741),
    StepCase("iresnet50 b256 2M", "iresnet50", 256, 2_000_000, anchor=1252),
    StepCase("iresnet100 b128 93k", "iresnet100", 128, 93_431, anchor=1161),
    StepCase("mobilefacenet b512 93k", "mobilefacenet", 512, 93_431, anchor=5372),
]


def smoke_cases() -> list[StepCase]:
    """The same cases shrunk to run on a CPU: IResNets become the 1/8-width "tiny" IResNet."""
    small = {"iresnet50": "tiny", "iresnet100": "tiny", "mobilefacenet": "mobilefacenet"}
    return [replace(c, backbone=small[c.backbone], batch=4, classes=max(50, c.classes // 1000)) for c in FULL]


# -- the peer-style step (the structure of arcface_torch's train_v2, written here) ---------
class _PeerCrossEntropy(torch.autograd.Function):
    """arcface_torch's DistCrossEntropyFunc at world size 1: in-place softmax, loss from the
    target probability clamped at 1e-30, backward (p - onehot) / B via boolean indexing."""

    @staticmethod
    def forward(ctx, logits, label):
        batch = logits.size(0)
        logits.sub_(logits.max(dim=1, keepdim=True).values).exp_()
        logits.div_(logits.sum(dim=1, keepdim=True))
        index = torch.where(label != -1)[0]
        loss = torch.zeros(batch, 1, device=logits.device)
        loss[index] = logits[index].gather(1, label[index])
        ctx.save_for_backward(index, logits, label)
        return loss.clamp_min_(1e-30).log_().mean() * (-1)

    @staticmethod
    def backward(ctx, grad):
        index, logits, label = ctx.saved_tensors
        one_hot = torch.zeros(size=[index.size(0), logits.size(1)], device=logits.device)
        one_hot.scatter_(1, label[index], 1)
        logits[index] -= one_hot
        logits.div_(logits.size(0))
        return logits * grad.item(), None


class PeerStep:
    def __init__(self, case: StepCase, device: torch.device, s: float = 64.0, m: float = 0.5):
        torch.manual_seed(0)
        self.device, self.s, self.m, self.case = device, s, m, case
        self.backbone = build_backbone(case.backbone, 512).to(device)
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (case.classes, 512), device=device))
        self.opt = torch.optim.SGD([{"params": self.backbone.parameters()}, {"params": [self.weight]}],
                                   lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.fp16 = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fp16)

    def _sample(self, labels):
        """Partial-FC v2: every positive class plus random negatives (data-dependent shapes)."""
        positive = torch.unique(labels, sorted=True)
        num_sample = int(self.case.sample_rate * self.case.classes)
        if num_sample - positive.size(0) >= 0:
            perm = torch.rand(self.case.classes, device=self.device)
            perm[positive] = 2.0
            index = torch.topk(perm, k=num_sample)[1].sort()[0]
        else:
            index = positive
        labels = torch.searchsorted(index, labels)
        return self.weight[index], labels

    def head_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The classification layer: centres selected, cosines in fp16 autocast then fp32,
        the margin through arccos under no_grad, the in-place cross entropy."""
        labels = labels.view(-1, 1)
        weight = self.weight
        if self.case.sample_rate < 1:
            weight, labels = self._sample(labels.view(-1))
            labels = labels.view(-1, 1)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            logits = F.linear(F.normalize(emb), F.normalize(weight))
        logits = logits.float().clamp(-1, 1)
        index = torch.where(labels.view(-1) != -1)[0]
        target = logits[index, labels[index].view(-1)]
        with torch.no_grad():
            target.arccos_()
            logits.arccos_()
            logits[index, labels[index].view(-1)] = target + self.m
            logits.cos_()
        return _PeerCrossEntropy.apply(logits * self.s, labels)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            emb = self.backbone(images)
        loss = self.head_loss(emb, labels)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), 5)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad()
        return loss.detach()


# -- measurements --------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed(step_fn, warmup: int, timed: int, device) -> tuple[float, float]:
    """(median seconds per step, first step's seconds)."""
    times = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        step_fn()
        _sync(device)  # the benchmark's sync, not the step's: per-step wall time
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), times[0]


def ours_cfg(case: StepCase, compiled: bool, smoke: bool) -> TrainConfig:
    return TrainConfig(backbone=case.backbone, embedding_size=512, batch_size=case.batch, sample_rate=case.sample_rate,
                       workers=1, compile=compiled, compile_backend="aot_eager" if smoke else "inductor")


def synthetic_batch(case: StepCase, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (case.batch, 112, 112, 3), dtype=torch.uint8, generator=g)
    if device.type == "cuda":
        images = images.pin_memory()
    labels = torch.randint(0, case.classes, (case.batch,), generator=g)
    flips = torch.rand(case.batch, generator=g) < 0.5
    return images, labels, flips


def bench_ours(case: StepCase, compiled: bool, device, warmup: int, timed: int, smoke: bool) -> dict:
    _reset_peak(device)
    cfg = ours_cfg(case, compiled, smoke)
    trainee = Trainee(cfg, case.classes, 0, 1, device, MarginConfig(scale=64.0, arcface=ArcFaceParams(m=0.5)))
    images, labels, flips = synthetic_batch(case, device)
    median, first = _timed(lambda: trainee.step(images, labels, 0.1, flips=flips), warmup, timed, device)
    return {"step": "ours compiled" if compiled else "ours eager", "samples_per_s": round(case.batch / median, 1),
            "peak_gib": _peak_gib(device), "compile_s": round(trainee.compile_seconds, 1) if compiled else None,
            "first_step_s": round(first, 2)}


def bench_peer(case: StepCase, device, warmup: int, timed: int) -> dict:
    _reset_peak(device)
    peer = PeerStep(case, device)
    images, labels, flips = synthetic_batch(case, device)
    # The peer's best case: its input already normalised float on the device (DALI-style).
    from pipelines.training.data import device_input

    ready = device_input(images, flips, device)
    labels = labels.to(device)
    median, first = _timed(lambda: peer.step(ready, labels), warmup, timed, device)
    return {"step": "peer-style (arcface_torch train_v2 structure)", "samples_per_s": round(case.batch / median, 1),
            "peak_gib": _peak_gib(device), "compile_s": None, "first_step_s": round(first, 2)}


def count_head_buffers(batch: int = 17, classes: int = 4099) -> list[dict]:
    """B x C_r allocations of the classification layer's forward + backward. The count does
    not depend on the sizes, so a small problem gives the figure at 2M classes too."""
    from arcface_core.classifier import ShardedMarginClassifier
    from arcface_core.margins import ArcFace
    from arcface_core.memory import count_new_buffers

    rows = []
    for label, fused in (("ours: fused node", True), ("ours: composed autograd ops", False)):
        layer = ShardedMarginClassifier(classes, 32, ArcFace())
        emb = torch.randn(batch, 32, requires_grad=True)
        labels = torch.randint(0, classes, (batch,))
        rows.append({"path": label, "bxc_buffers": count_new_buffers(
            lambda: layer(emb, labels, fused=fused).backward(), (batch, classes))})
    peer = PeerStep(StepCase("count", "tiny", batch, classes), torch.device("cpu"))
    emb = torch.randn(batch, 512, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    rows.append({"path": "peer-style head", "bxc_buffers": count_new_buffers(
        lambda: peer.head_loss(emb, labels).backward(), (batch, classes))})
    return rows


def bench_from_shards(case: StepCase, device, warmup: int, timed: int, smoke: bool, work: str,
                      threads: int) -> dict:
    """The first case end to end: synthetic shards on local disk -> BatchStream -> step."""
    from benchmarks.synthetic_refined import write_synthetic_refined
    from pipelines.training.data import BatchStream, ShardDataset

    started = time.perf_counter()
    per_id = max(1, -(-case.batch * (warmup + timed + 2) // case.classes))  # enough faces for the steps
    write_synthetic_refined(os.path.join(work, "shards"), identities=case.classes, images_per_identity=per_id,
                            threads=threads)
    written = time.perf_counter() - started
    data = ShardDataset(os.path.join(work, "shards"))
    trainee = Trainee(ours_cfg(case, False, smoke), data.num_classes, 0, 1, device,
                      MarginConfig(scale=64.0, arcface=ArcFaceParams(m=0.5)))
    stream = BatchStream(data, case.batch, 0, 1, threads=threads, pin_memory=device.type == "cuda",
                         prepare_on_host=device.type != "cuda")
    batches = stream.iterate(0, 0, warmup + timed)
    median, _ = _timed(lambda: (lambda b: trainee.step(b.images, b.labels, 0.1, flips=b.flips))(next(batches)[1]),
                       warmup, timed, device)
    stream.close()
    return {"step": f"ours eager, from shards ({threads} decode threads)", "samples_per_s": round(case.batch / median, 1),
            "peak_gib": _peak_gib(device), "faces_written": data.num_samples, "write_s": round(written, 1)}


def bench_mtcnn(device, photos: int, batch: int) -> dict:
    from cleaning.align import align_face
    from cleaning.detect.mtcnn import MTCNN
    from cleaning.synthetic.render import random_identity, render

    rng = np.random.default_rng(0)
    images = [np.ascontiguousarray(render(random_identity(rng), rng, size=512).image[..., ::-1]) for _ in range(photos)]
    detector = MTCNN(device=device)
    detector.detect(images[:2])  # warm-up: kernels, allocator
    _sync(device)
    start = time.perf_counter()
    found = 0
    for i in range(0, photos, batch):
        chunk = images[i:i + batch]
        for img, faces in zip(chunk, detector.detect(chunk)):
            if faces:
                align_face(img, faces[0].landmarks)
                found += 1
    _sync(device)
    seconds = time.perf_counter() - start
    return {"photos": photos, "batch": batch, "faces_aligned": found, "photos_per_s": round(photos / seconds, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: every code path, not a measurement")
    ap.add_argument("--out", default=None,
                    help="where results go (default: benchmarks/results; with --smoke, a scratch folder, so a "
                         "check of the code paths never rewrites the committed measurements)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--timed", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="skip what would start after this (default 420)")
    ap.add_argument("--decode-threads", type=int, default=None)
    args = ap.parse_args()
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if not smoke and device.type != "cuda":
        sys.exit("bench_gpu: no CUDA device here; run with --smoke to exercise the code paths on CPU")
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    timed = args.timed if args.timed is not None else (2 if smoke else 20)
    budget = args.budget_s if args.budget_s is not None else (110 if smoke else 420)
    threads = args.decode_threads or (2 if smoke else max(2, (os.cpu_count() or 4) - 2))
    cases = smoke_cases() if smoke else FULL
    if smoke:
        torch.set_num_threads(2)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    begun = time.perf_counter()
    out = Path(args.out or (Path(tempfile.gettempdir()) / "arcface-bench-gpu-smoke" if smoke
                            else Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if smoke else ""
    jsonl = out / f"gpu_step{suffix}.jsonl"
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "warmup": warmup, "timed": timed, "smoke": smoke}
    records: list[dict] = [{"kind": "meta", **meta}]

    def record(kind: str, **fields):
        row = {"kind": kind, **fields}
        records.append(row)
        print(json.dumps(row), flush=True)

    def guarded(kind: str, what: dict, fn):
        if time.perf_counter() - begun > budget:
            record(kind, **what, skipped=f"time budget of {budget:.0f} s spent")
            return
        try:
            record(kind, **what, **fn())
        except torch.cuda.OutOfMemoryError as exc:
            record(kind, **what, skipped=f"out of device memory: {str(exc).splitlines()[0]}")
        except Exception as exc:  # one case failing must not hide the others' figures
            record(kind, **what, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for row in count_head_buffers():
        record("head_buffers", **row)
    for case in cases:
        what = {"case": case.name, "backbone": case.backbone, "batch": case.batch, "classes": case.classes,
                "sample_rate": case.sample_rate, "anchor_samples_per_s": None if smoke else case.anchor}
        guarded("step", what, lambda: bench_peer(case, device, warmup, timed))
        guarded("step", what, lambda: bench_ours(case, False, device, warmup, timed, smoke))
        guarded("step", what, lambda: bench_ours(case, True, device, warmup, timed, smoke))
    with tempfile.TemporaryDirectory() as work:
        case = cases[0]
        guarded("from_shards", {"case": case.name, "batch": case.batch, "classes": case.classes},
                lambda: bench_from_shards(case, device, warmup, timed, smoke, work, threads))
    from cleaning.detect.weights import have_weights

    if have_weights():
        guarded("mtcnn", {"size": 512}, lambda: bench_mtcnn(device, 8 if smoke else 256, 4 if smoke else 64))
    else:  # machines without a package index (GPU hosts often) cannot fetch them here
        record("mtcnn", size=512, skipped="MTCNN weights not cached: run `arcface fetch-weights` first, or point "
                                          "ARCFACE_CACHE at a copy")
    record("total", seconds=round(time.perf_counter() - begun, 1))

    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / f"gpu_step{suffix}.md").write_text(markdown(records, meta))
    print(markdown(records, meta))
    failed = [r for r in records if "error" in r]
    sys.exit(1 if failed else 0)


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"# Training step and detector on {meta['device']}" + (" (smoke: tiny sizes, not a measurement)"
                                                                       if meta["smoke"] else ""), "",
             f"`{meta['command']}` on {meta['date']}, torch {meta['torch']}; median of {meta['timed']} timed steps "
             f"after {meta['warmup']} warm-up steps.", "",
             "| case | step | samples/s | vs peer-style | vs DESIGN anchor | peak GiB | compile s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    peer: dict[str, float] = {}
    for r in records:
        if r["kind"] != "step":
            continue
        if "samples_per_s" not in r:
            lines.append(f"| {r['case']} | {r.get('step', '')} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        if r["step"].startswith("peer"):
            peer[r["case"]] = r["samples_per_s"]
        ratio = f"{r['samples_per_s'] / peer[r['case']]:.2f}x" if r["case"] in peer else ""
        anchor = f"{r['samples_per_s'] / r['anchor_samples_per_s']:.2f}x" if r.get("anchor_samples_per_s") else ""
        lines.append(f"| {r['case']} | {r['step']} | {r['samples_per_s']} | {ratio} | {anchor} | "
                     f"{r.get('peak_gib') if r.get('peak_gib') is not None else ''} | "
                     f"{r.get('compile_s') if r.get('compile_s') is not None else ''} |")
    lines += ["", "| classification layer path | B x C_r buffers allocated per step |", "|---|---:|"]
    lines += [f"| {r['path']} | {r['bxc_buffers']} |" for r in records if r["kind"] == "head_buffers"]
    for r in records:
        if r["kind"] == "from_shards":
            lines += ["", f"From shards ({r['case']}): " + (f"{r['samples_per_s']} samples/s, {r['step']}; "
                      f"{r['faces_written']} synthetic faces written in {r['write_s']} s"
                      if "samples_per_s" in r else str(r.get("skipped") or r.get("error")))]
        if r["kind"] == "mtcnn":
            lines += ["", "MTCNN detect + align, 512 px photos: " + (f"{r['photos_per_s']} photos/s (batch "
                      f"{r['batch']}, {r['faces_aligned']}/{r['photos']} faces aligned)"
                      if "photos_per_s" in r else str(r.get("skipped") or r.get("error")))]
        if r["kind"] == "total":
            lines += ["", f"Total {r['seconds']} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""The GPU path: `pytest -m gpu` on a machine with CUDA. Each check is parametrised over
devices; the CPU case runs in the default suite, the CUDA case is marked `gpu` and skipped
without CUDA, so the same assertions guard both (and a typo cannot wait for a GPU to show)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arcface_core.classifier import ShardedMarginClassifier, distributed_cross_entropy
from arcface_core.margins import ArcFace, CombinedMargin, CosFace, SphereFace
from pipelines.training.config import ArcFaceParams, MarginConfig, TrainConfig
from pipelines.training.step import Trainee

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])
DEVICES = ["cpu", CUDA]


def single_process_reference(weight, emb, labels, margin):
    """float64 on the CPU, plain autograd ops and torch's cross entropy."""
    w = weight.detach().double().clone().requires_grad_(True)
    e = emb.detach().double().clone().requires_grad_(True)
    cos = F.linear(F.normalize(e, dim=1), F.normalize(w, dim=1))
    loss = F.cross_entropy(margin(cos, labels), labels)
    loss.backward()
    return loss.detach(), e.grad, w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_classifier_matches_the_single_process_computation(device, fused, sample_rate):
    g = torch.Generator().manual_seed(1)
    classes, dim, batch = 300, 64, 48
    weight = torch.randn(classes, dim, generator=g)
    emb = torch.randn(batch, dim, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    layer = ShardedMarginClassifier(classes, dim, ArcFace(s=32.0, m=0.5), sample_rate=sample_rate).to(device)
    with torch.no_grad():
        layer.weight.copy_(weight)
    e = emb.to(device).requires_grad_(True)
    loss = layer(e, labels.to(device), fused=fused)
    loss.backward()
    sampled = layer.last_sampled.cpu()
    ref_loss, ref_e, ref_w = single_process_reference(weight[sampled], emb, torch.searchsorted(sampled, labels),
                                                      ArcFace(s=32.0, m=0.5))
    torch.testing.assert_close(loss.cpu().double(), ref_loss, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(e.grad.cpu().double(), ref_e, atol=2e-6, rtol=1e-4)
    grad_w = layer.weight.grad.cpu().double()
    torch.testing.assert_close(grad_w[sampled], ref_w, atol=2e-6, rtol=1e-4)
    assert (grad_w.abs().sum(1) > 0).sum() <= len(sampled)


def _nccl_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(2)
        classes, dim, batch = 301, 32, 16
        weight, emb = torch.randn(classes, dim, generator=g), torch.randn(batch * world, dim, generator=g)
        labels = torch.randint(0, classes, (batch * world,), generator=g)
        layer = ShardedMarginClassifier(classes, dim, ArcFace(s=32.0, m=0.5)).cuda()
        with torch.no_grad():
            layer.weight.copy_(weight[layer.class_start:layer.class_end])
        e = emb[rank * batch:(rank + 1) * batch].cuda().requires_grad_(True)
        loss = layer(e, labels[rank * batch:(rank + 1) * batch].cuda(), shares=[batch] * world)
        loss.backward()
        torch.save({"loss": loss.cpu(), "e": e.grad.cpu(), "w": layer.weight.grad.cpu(),
                    "start": layer.class_start}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from dist_helpers import free_port

    mp.start_processes(_nccl_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    g = torch.Generator().manual_seed(2)
    weight, emb = torch.randn(301, 32, generator=g), torch.randn(32, 32, generator=g)
    labels = torch.randint(0, 301, (32,), generator=g)
    loss, e, w = single_process_reference(weight, emb, labels, ArcFace(s=32.0, m=0.5))
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["loss"].double(), loss, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(res["e"].double(), e[r * 16:(r + 1) * 16], atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(torch.cat([ranks[0]["w"], ranks[1]["w"]]).double(), w, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", [ArcFace(64.0, 0.5), CosFace(64.0), CombinedMargin(64.0, 1.0, 0.3, 0.2),
                                    SphereFace(64.0)], ids=["arcface", "cosface", "combined", "sphereface"])
def test_margins_under_reduced_precision_have_no_nan_at_cos_plus_minus_one(device, dtype, margin):
    """Embeddings from a reduced-precision backbone exactly on (and opposite to) their centres."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 autocast is a GPU mode")
    dim = 16
    centres = F.normalize(torch.randn(6, dim), dim=1)
    emb = torch.cat([centres[:3], -centres[3:]]).to(device, dtype).requires_grad_(True)  # cos = +1 and -1
    layer = ShardedMarginClassifier(6, dim, margin).to(device)
    with torch.no_grad():
        layer.weight.copy_(centres)
    for fused in (True, False):
        emb.grad, layer.weight.grad = None, None
        with torch.autocast(device, dtype=dtype):
            loss = layer(emb, torch.arange(6, device=device), fused=fused)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(emb.grad.float()).all() and torch.isfinite(layer.weight.grad).all()


def _trainee(device, **kw) -> Trainee:
    cfg = TrainConfig(backbone="tiny", embedding_size=32, batch_size=8, lr=0.05, workers=1, **kw)
    return Trainee(cfg, 20, 0, 1, torch.device(device), MarginConfig(scale=16.0, arcface=ArcFaceParams(m=0.3)))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_and_eager_steps_agree(device):
    """torch.compile (inductor on CUDA; aot_eager on CPU, where inductor crashed) gives the
    eager losses within tolerance over a few steps, and reports its compile time."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (8, 112, 112, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 20, (8,), generator=g), torch.rand(8, generator=g) < 0.5) for _ in range(4)]
    losses = {}
    for compiled in (False, True):
        trainee = _trainee(device, compile=compiled, compile_backend=backend, amp="off")
        losses[compiled] = torch.stack([trainee.step(i, l, 0.05, flips=f) for i, l, f in batches]).cpu()
        if compiled:
            assert trainee.compile_seconds is not None and trainee.compile_seconds > 0
    torch.testing.assert_close(losses[True], losses[False], atol=1e-3, rtol=1e-3)


def test_inductor_on_cpu_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="aot_eager"):
        _trainee("cpu", compile=True)


@pytest.mark.parametrize("device", DEVICES)
def test_the_step_moves_uint8_and_keeps_the_layout(device):
    """uint8 in (pinned on CUDA), channels_last on CUDA by default, the loss left on the
    device, and on CUDA no host synchronisation inside the step (sync debug mode "error")."""
    trainee = _trainee(device)
    images = torch.randint(0, 256, (8, 112, 112, 3), dtype=torch.uint8)
    if device == "cuda":
        images = images.pin_memory()
        assert trainee.channels_last and trainee.amp_dtype == torch.bfloat16
        conv = next(m for m in trainee.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert trainee.opt_backbone.defaults.get("fused")
    else:
        assert not trainee.channels_last and trainee.amp_dtype is None
        assert trainee.opt_backbone.defaults.get("foreach")
    labels, flips = torch.randint(0, 20, (8,)), torch.rand(8) < 0.5
    if device == "cuda":
        labels, flips = labels.pin_memory(), flips.pin_memory()
    loss = trainee.step(images, labels, 0.05, flips=flips)
    assert loss.device.type == device and torch.isfinite(loss)
    if device == "cuda":  # after the first step (allocator, cuDNN set-up), a step never waits for the GPU
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = trainee.step(images, labels, 0.05, flips=flips)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss)


@pytest.mark.parametrize("device", DEVICES)
def test_mtcnn_on_the_device_finds_what_the_cpu_finds(device):
    from cleaning.detect.mtcnn import MTCNN
    from cleaning.synthetic.render import random_identity, render

    rng = np.random.default_rng(4)
    photos = [np.ascontiguousarray(render(random_identity(rng), rng, size=250).image[..., ::-1]) for _ in range(3)]
    cpu = MTCNN(device="cpu").detect(photos)
    here = MTCNN(device=device).detect(photos)
    for a, b in zip(cpu, here):
        assert len(a) == len(b) >= 1
        np.testing.assert_allclose(a[0].box, b[0].box, atol=1.0)
        np.testing.assert_allclose(a[0].landmarks, b[0].landmarks, atol=1.0)


@pytest.mark.gpu
@pytest.mark.services
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_arcface_train_on_cuda_checkpoints_and_resumes(tmp_path, demo_shards):
    """30 steps through `arcface train` on one GPU, then 10 more resumed from its checkpoint."""
    env = dict(os.environ, ARCFACE_STATE_DIR=str(tmp_path / "state"))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    base = [sys.executable, "-m", "pipelines.cli", "train", "--data", str(demo_shards), "--config",
            str(ROOT / "configs" / "demo-train.toml"), "--storage", str(tmp_path / "runs"), "--no-mlflow",
            "--set", "train.gpu=true", "--set", "train.workers=1", "--set", "train.checkpoint_every=10",
            "--set", "train.eval_every=0", "--set", "train.epochs=50"]
    first = subprocess.run(base + ["--name", "cuda", "--max-steps", "30"], env=env, capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    checkpoint = next(l for l in first.stdout.splitlines() if l.startswith("checkpoint: "))[12:]
    assert json.loads(Path(checkpoint, "state.json").read_text())["step"] == 30
    second = subprocess.run(base + ["--name", "cuda-resumed", "--max-steps", "40", "--resume", checkpoint], env=env,
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = [json.loads(l) for l in (tmp_path / "runs" / "cuda-resumed" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(31, 41))
    assert all(np.isfinite(r["loss"]) for r in log)


@pytest.mark.gpu
@pytest.mark.services
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_embedding_actors_on_cuda_match_the_cpu(tmp_path, demo_shards):
    """embed_dataset's Ray actors on the GPU give the CPU's embeddings (an fp32 model)."""
    import ray

    from dataset import RefinedDataset
    from pipelines.embed import embed_dataset, read_embeddings
    import dataclasses

    trainee = _trainee("cpu")
    model_dir = tmp_path / "model"  # a training checkpoint: load_embedder puts it on the asked device
    model_dir.mkdir()
    trainee.save(str(model_dir), {"step": 0, "world": 1, "config": dataclasses.asdict(trainee.cfg)})
    data = RefinedDataset.open(str(demo_shards))
    try:
        results = {}
        for gpu in (False, True):
            copy = tmp_path / f"data-{gpu}"
            subprocess.run(["cp", "-r", str(demo_shards), str(copy)], check=True)
            copied = RefinedDataset.open(str(copy))
            embed_dataset(copied, str(model_dir), workers=1, gpu=gpu)
            results[gpu] = read_embeddings(copied, str(model_dir))[0]
    finally:
        ray.shutdown()
    assert results[True].shape == results[False].shape and len(results[True]) == data.manifest.num_images
    a, b = (r / np.linalg.norm(r, axis=1, keepdims=True) for r in (results[True], results[False]))
    assert (a * b).sum(1).min() > 0.999  # the same directions (cuDNN's TF32 convolutions differ in the last bits)


def test_bench_gpu_smoke_runs_every_path(tmp_path):
    """`benchmarks/bench_gpu.py --smoke`: every case, eager and compiled, the peer-style step,
    the buffer count, the from-shards run and MTCNN, on CPU; no case may error."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "gpu_step_smoke.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert len(steps) == 5 * 3 and all(r["samples_per_s"] > 0 for r in steps)
    assert {r["step"] for r in steps} == {"peer-style (arcface_torch train_v2 structure)", "ours eager",
                                          "ours compiled"}
    buffers = {r["path"]: r["bxc_buffers"] for r in rows if r["kind"] == "head_buffers"}
    assert buffers["ours: fused node"] == 1 < buffers["peer-style head"] < buffers["ours: composed autograd ops"]
    assert next(r for r in rows if r["kind"] == "from_shards")["samples_per_s"] > 0
    mtcnn = next(r for r in rows if r["kind"] == "mtcnn")
    assert mtcnn["faces_aligned"] == mtcnn["photos"] and mtcnn["photos_per_s"] > 0
    assert "| ours: fused node | 1 |" in (tmp_path / "gpu_step_smoke.md").read_text()

"""Data-parallel + model-parallel training equals one process, and checkpoints re-shard."""

import numpy as np
import pytest
import torch

from pipelines.training.config import ArcFaceParams, MarginConfig, TrainConfig
from pipelines.training.data import BatchStream, ShardDataset
from pipelines.training.step import Trainee, lr_at

from dist_helpers import run_distributed

STEPS = 3
# In float64 the two runs agree to ~1e-12: the computation is the same. In float32 the
# different summation order (all-reduce, global batch norm) gives ~1e-6 relative gradient
# differences at the first step, which this tiny batch-norm-heavy net (batch 16) amplifies
# to ~3e-3 absolute in some parameters after 3 steps (measured); the bound leaves 3x room.
FP32_ATOL = 1e-2
ATOL = 1e-4  # one step from the same checkpoint


def small_cfg(**kw) -> TrainConfig:
    base = dict(backbone="tiny", embedding_size=32, batch_size=16, lr=0.01, warmup_steps=0, epochs=1,
                decode_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def run_steps(rank, world, data_uri, steps, cfg_kw, load_dir=None, save_dir=None, dtype="float32", frozen_bn=False):
    torch.set_default_dtype(getattr(torch, dtype))
    cfg = small_cfg(**cfg_kw)
    data = ShardDataset(data_uri)
    margin = MarginConfig(scale=16.0, arcface=ArcFaceParams(m=0.3))
    trainee = Trainee(cfg, data.num_classes, rank, world, torch.device("cpu"), margin)
    if frozen_bn:  # batch norm on its running statistics: the backbone is a per-sample function
        trainee.backbone.eval()
    start = 0
    if load_dir:
        start = trainee.load(load_dir)["step"]
    stream = BatchStream(data, cfg.batch_size, rank, world, seed=cfg.seed, threads=1)
    total = data.steps_per_epoch(cfg.batch_size)
    losses = []
    for step, batch in stream.iterate(0, start, start + steps):
        losses.append(trainee.step(batch.images, batch.labels, lr_at(step, cfg, total), flips=batch.flips))
    if save_dir:
        trainee.save(save_dir, {"step": start + steps, "world": world})
    out = {"losses": torch.stack(losses), "centres": trainee.head.weight.detach().clone(),
           "start": torch.tensor(trainee.head.class_start)}
    out.update({f"backbone.{k}": v.detach().clone() for k, v in trainee.backbone.state_dict().items()})
    stream.close()
    return out


@pytest.mark.parametrize("dtype, atol", [("float64", 1e-9), ("float32", FP32_ATOL)])
def test_two_workers_follow_one_process(tmp_path, demo_shards, dtype, atol):
    data = str(demo_shards)
    single = run_distributed(run_steps, 1, (data, STEPS, {}, None, None, dtype), str(tmp_path / "one"))[0]
    pair = run_distributed(run_steps, 2, (data, STEPS, {}, None, None, dtype), str(tmp_path / "two"))
    torch.testing.assert_close(pair[0]["losses"], single["losses"], atol=atol, rtol=0)
    torch.testing.assert_close(pair[1]["losses"], single["losses"], atol=atol, rtol=0)
    centres = torch.cat([r["centres"] for r in sorted(pair, key=lambda r: int(r["start"]))])
    torch.testing.assert_close(centres, single["centres"], atol=atol, rtol=0)
    for key, value in single.items():
        if key.startswith("backbone.") and value.is_floating_point():
            for r in pair:
                torch.testing.assert_close(r[key], value, atol=atol, rtol=0, msg=key)
    assert not torch.equal(single["losses"][0], single["losses"][-1])  # it did train


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_worker_count(tmp_path, demo_shards, before, after):
    data = str(demo_shards)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # Reference: the original worker count runs 2 steps, then the next one, uninterrupted.
    (tmp_path / "a").mkdir()
    ref = run_distributed(run_steps, before, (data, 2, {}, None, str(ckpt)), str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    cont = run_distributed(run_steps, before, (data, 1, {}, str(ckpt)), str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    moved = run_distributed(run_steps, after, (data, 1, {}, str(ckpt)), str(tmp_path / "c"))
    assert len(list(ckpt.glob("centres-*.pt"))) == before
    torch.testing.assert_close(moved[0]["losses"], cont[0]["losses"], atol=ATOL, rtol=0)
    c_cont = torch.cat([r["centres"] for r in sorted(cont, key=lambda r: int(r["start"]))])
    c_moved = torch.cat([r["centres"] for r in sorted(moved, key=lambda r: int(r["start"]))])
    torch.testing.assert_close(c_moved, c_cont, atol=ATOL, rtol=0)
    assert ref[0]["losses"].shape == (2,)


def test_global_order_is_world_size_independent(demo_shards):
    data = ShardDataset(str(demo_shards))
    one = BatchStream(data, 16, 0, 1)
    two = [BatchStream(data, 16, r, 2) for r in range(2)]
    for step in range(3):
        np.testing.assert_array_equal(one.samples(1, step), np.concatenate([s.samples(1, step) for s in two]))
    assert not np.array_equal(one.samples(0, 0), one.samples(1, 0))  # reshuffled per epoch
    order = data.epoch_order(0, 0, 4)
    assert sorted(order.tolist()) == list(range(data.num_samples))


# Gradient accumulation, in float64 with the stride-2 tiny backbone (float64 convolutions at
# 112 x 112 cost ~4 s a step on a busy 2-core machine). Runs on 2 workers, in one set of processes (a process group costs
# seconds): (name, train settings, frozen batch norm).
ACCUMULATION_RUNS = [
    ("acc2", {"gradient_accumulation": 2}, True),
    ("pfc", {"sample_rate": 0.5}, True),
    ("pfc-acc2", {"sample_rate": 0.5, "gradient_accumulation": 2}, True),
    ("per-worker-bn", {"sync_bn": False}, False),
]


FAST = {"backbone": "tiny-s2"}


def accumulation_runs(rank, world, data_uri):
    out = {}
    for name, cfg_kw, frozen in ACCUMULATION_RUNS:
        result = run_steps(rank, world, data_uri, STEPS, {**FAST, **cfg_kw}, dtype="float64", frozen_bn=frozen)
        out.update({f"{name}/{k}": v for k, v in result.items()})
    return out


def in_process(data_uri, cfg_kw, frozen):
    """run_steps at world 1 without a process group (float64), restoring the default dtype."""
    try:
        return run_steps(0, 1, data_uri, STEPS, {**FAST, **cfg_kw}, dtype="float64", frozen_bn=frozen)
    finally:
        torch.set_default_dtype(torch.float32)


def assert_same_run(run, ref, atol=1e-9, parameters_only=False):
    """Losses, centres (whole, from every rank's shard) and backbone equal."""
    runs = run if isinstance(run, list) else [run]
    for r in runs:
        torch.testing.assert_close(r["losses"], ref["losses"], atol=atol, rtol=0)
    centres = torch.cat([r["centres"] for r in sorted(runs, key=lambda r: int(r["start"]))])
    torch.testing.assert_close(centres, ref["centres"], atol=atol, rtol=0)
    for key, value in ref.items():
        buffer = key.endswith(("running_mean", "running_var", "num_batches_tracked"))
        if key.startswith("backbone.") and value.is_floating_point() and not (parameters_only and buffer):
            for r in runs:
                torch.testing.assert_close(r[key], value, atol=atol, rtol=0, msg=key)


def test_gradient_accumulation_equals_the_whole_batch_on_one_worker(demo_shards):
    """2 micro-batches of 8 = one batch of 16 over 3 steps (float64, to 1e-9): Partial-FC
    draws one sample for both (so the same classes), the head's gradient and the backbone's
    add up to the whole batch's. Batch norm on running statistics: per sample."""
    data = str(demo_shards)
    for cfg_kw in ({}, {"sample_rate": 0.5}):
        whole = in_process(data, cfg_kw, frozen=True)
        split = in_process(data, {**cfg_kw, "gradient_accumulation": 2}, frozen=True)
        assert_same_run(split, whole)
        assert not torch.equal(whole["losses"][0], whole["losses"][-1])  # it did train
    # the tolerance can tell: 4 micro-batches of a different batch (the global order is per
    # batch size) does not give the same run
    other = in_process(data, {"batch_size": 8, "gradient_accumulation": 2}, frozen=True)
    with pytest.raises(AssertionError):
        assert_same_run(other, whole)


def test_gradient_accumulation_on_two_workers_with_the_sharded_head(tmp_path, demo_shards):
    """2 workers, each running 2 micro-batches of 4 rows, with the class centres sharded
    across them (DDP skips its all-reduce on the first micro-batch): the same run as one
    process with the whole batch of 16; with Partial-FC, the same run as 2 workers without
    accumulation (the sample depends on the worker count). And accumulation on one worker is
    2 workers with per-worker batch norm in training mode: micro-batch k is worker k's share."""
    data = str(demo_shards)
    pair = run_distributed(accumulation_runs, 2, (data,), str(tmp_path))
    take = lambda name: [{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(name + "/")} for r in pair]
    assert_same_run(take("acc2"), in_process(data, {}, frozen=True))
    for accumulated, whole in zip(take("pfc-acc2"), take("pfc")):  # rank by rank: its shard of the centres
        assert_same_run(accumulated, whole)
    acc_train_bn = in_process(data, {"gradient_accumulation": 2}, frozen=False)
    assert_same_run(take("per-worker-bn"), acc_train_bn, parameters_only=True)

"""The recipes in configs/: each parses, validates, says its worker layout and reference
figures, refuses data of another class count, and trains a few steps on CPU through the
training step's own code (Trainee, BatchStream, lr_at) with its sizes overridden: the demo's
data, one worker, a batch of 2 rows per micro-batch; ViT-B, too slow to train on a CPU in
seconds, trains as the smallest network of its family (its own network is still built and
run forward once)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.config import load_config, to_toml
from pipelines.training.config import RecipeMismatch, TrainConfig, check_recipe_matches

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.toml") if p.name != "demo-train.toml")
# The recipe's own backbone trains, but for ViT-B: 3.5 s per 2-row micro-batch on 2 cores,
# x 12 micro-batches a step; it trains as the smallest of its family, ViT-T (0.25 s).
CPU_STAND_IN = {"vit_b_dp005_mask_005": "vit_t_dp005_mask0"}
REQUIRED = {"iresnet100", "iresnet50", "mobilefacenet", "vit_t_dp005_mask0", "vit_b_dp005_mask_005"}


def recipe_ids():
    return [p.stem for p in RECIPES]


def test_the_recipes_cover_the_issue():
    names = {p.stem for p in RECIPES}
    assert {"ms1mv2_r100", "ms1mv3_r50", "ms1mv3_r100", "glint360k_r100", "wf42m_pfc02_r100"} <= names
    assert REQUIRED <= {load_config(p, environ={}).train.backbone for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=recipe_ids())
def test_recipe_parses_validates_and_states_its_layout(path):
    cfg = load_config(path, environ={})  # validates (ranges, warm-up, batch split)
    t = cfg.train
    assert t.num_classes > 0 and t.num_images > t.num_classes and t.name == path.stem
    # The worker layout in words beside batch_size: GPUs x per-GPU batch [x micro-batches].
    line = next(l for l in path.read_text().splitlines() if l.startswith("batch_size"))
    factors = [int(x) for x in re.search(r"#\s*([\d x]+)$", line).group(1).split(" x ")]
    assert math.prod(factors) == t.batch_size
    assert factors[0] == t.workers and (factors[2] if len(factors) > 2 else 1) == t.gradient_accumulation
    assert f"global batch {t.batch_size}" in path.read_text()
    # The published figures and where they come from.
    ref = cfg.reference
    assert "README.md" in ref["source"] and ref["arcface_torch_config"].startswith("recognition/arcface_torch/configs/")
    for key in ("ijbc_tar_at_far_1e-4", "ijbc_tar_at_far_1e-5", "mfr_all_tar_at_far_1e-6"):
        assert 0 < ref[key] <= 100
    assert ref["ijbc_tar_at_far_1e-5"] < ref["ijbc_tar_at_far_1e-4"]
    assert "throughput" in ref
    # The effective config, [reference] included, reads back to the same config.
    assert load_config_text(to_toml(cfg)).reference == ref


def load_config_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(text)
    try:
        return load_config(fh.name, environ={})
    finally:
        Path(fh.name).unlink()


def test_config_show_prints_the_reference():
    path = CONFIGS / "ms1mv3_r100.toml"
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "config", "show", "--config", str(path)],
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    reference = out.stdout.split("[reference]", 1)[1]
    assert "ijbc_tar_at_far_1e-4 = 96.85" in reference and "ijbc_tar_at_far_1e-5 = 95.02" in reference
    assert "num_classes = 93431" in out.stdout


def test_check_recipe_matches():
    cfg = TrainConfig(num_classes=93431, num_images=5179510)
    with pytest.raises(RecipeMismatch, match="the recipe is for 93,431 classes .* the data has 85,742"):
        check_recipe_matches(SimpleNamespace(num_classes=85742, num_images=5822653), cfg)
    assert check_recipe_matches(SimpleNamespace(num_classes=93431, num_images=5179510), cfg) == []
    notes = check_recipe_matches(SimpleNamespace(num_classes=93431, num_images=5000000), cfg)
    assert len(notes) == 1 and "5,179,510" in notes[0] and "-3.5%" in notes[0]
    # 0: no recipe dataset, any data
    assert check_recipe_matches(SimpleNamespace(num_classes=7, num_images=9), TrainConfig()) == []


@pytest.mark.parametrize("path", RECIPES, ids=recipe_ids())
def test_recipe_trains_a_few_steps_on_cpu(path, demo_shards):
    from arcface_core.backbones import build_backbone
    from pipelines.training.data import BatchStream, ShardDataset
    from pipelines.training.step import Trainee, lr_at

    data = ShardDataset(str(demo_shards))
    recipe = load_config(path, environ={})
    with pytest.raises(RecipeMismatch):  # the demo is not the recipe's dataset
        check_recipe_matches(SimpleNamespace(num_classes=data.num_classes, num_images=data.num_samples), recipe.train)

    # The recipe's own network, built at its embedding size, runs forward.
    backbone = build_backbone(recipe.train.backbone, recipe.train.embedding_size).eval()
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 112, 112)).shape == (1, recipe.train.embedding_size)
    del backbone

    acc = recipe.train.gradient_accumulation
    stand_in = CPU_STAND_IN.get(recipe.train.backbone, recipe.train.backbone)
    cfg = load_config(path, [f"train.backbone={stand_in}", "train.num_classes=0", "train.workers=1", "train.gpu=false",
                             "train.amp=off", f"train.batch_size={2 * acc}"], environ={})
    t = cfg.train
    notes = check_recipe_matches(SimpleNamespace(num_classes=data.num_classes, num_images=data.num_samples), t)
    assert len(notes) == 1  # any class count now; the image count differs in degree only
    torch.manual_seed(0)
    trainee = Trainee(t, data.num_classes, 0, 1, torch.device("cpu"), cfg.margin)
    margin = trainee.margin
    assert margin.s == cfg.margin.scale and margin.interclass_filtering_threshold == cfg.margin.interclass_filtering_threshold
    assert (margin.m2, margin.m3) == ((cfg.margin.arcface.m, 0.0) if cfg.margin.type == "arcface" else (0.0, cfg.margin.cosface.m))
    spe = data.steps_per_epoch(t.batch_size)
    total = spe * t.epochs
    before = [p.detach().clone() for p in trainee.backbone.parameters()]
    stream = BatchStream(data, t.batch_size, 0, 1, seed=t.seed, threads=1)
    losses, rates = [], []
    try:
        for step, batch in stream.iterate(0, 0, 2):
            rates.append(lr_at(step, t, total, spe))
            losses.append(float(trainee.step(batch.images, batch.labels, rates[-1], flips=batch.flips)))
    finally:
        stream.close()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainee.backbone.parameters()))
    warmup = round(t.warmup_epochs * spe) if t.warmup_epochs else t.warmup_steps
    expected = [t.lr * (s + 1) / warmup if s < warmup else t.lr * (1 - s / total) ** t.poly_power for s in (0, 1)]
    assert rates == pytest.approx(expected)
    if t.sample_rate < 1:  # Partial-FC: the batch's positives plus the sampled share of negatives
        assert len(trainee.head.last_sampled) >= math.ceil(t.sample_rate * data.num_classes)
        assert len(trainee.head.last_sampled) < data.num_classes

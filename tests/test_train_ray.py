"""Training through Ray Train for real: `ray job submit` to a local head, worker failure, S3."""

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch

from dataset import RefinedDataset
from pipelines.config import load_config
from pipelines.evaluate import TorchEmbedder, load_pairs, verify
from pipelines.training.config import TrainConfig
from pipelines.training.driver import run_training
from pipelines.training.step import Trainee

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.services


def steps_log(storage: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (storage / name / "steps.jsonl").read_text().splitlines()]


MARGIN = load_config(ROOT / "configs" / "demo-train.toml").margin


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    cfg = load_config(ROOT / "configs" / "demo-train.toml").train
    cfg.storage = str(tmp_path / "runs")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def ray_local():
    import ray

    yield
    ray.shutdown()


def test_ray_job_submit_trains_and_beats_untrained(tmp_path, demo_shards):
    state = tmp_path / "state"
    ports = ["--set", "services.ray_port=6392", "--set", "services.ray_dashboard_port=8277"]
    env = dict(os.environ, ARCFACE_STATE_DIR=str(state), RAY_ADDRESS="http://127.0.0.1:8277")
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [sys.executable, "-m", "pipelines.cli"]
    try:
        subprocess.run(cli + ["services", "up", "--only", "ray", *ports], env=env, check=True, timeout=180,
                       capture_output=True)
        job = subprocess.run(cli + ["submit-train", "--data", str(demo_shards), "--config",
                                    str(ROOT / "configs" / "demo-train.toml"), "--storage", str(tmp_path / "runs"),
                                    "--name", "job", "--max-steps", "40", "--no-mlflow", *ports,
                                    "--set", "train.checkpoint_every=20", "--set", "train.eval_every=40",
                                    "--set", "train.epochs=50"],
                             env=env, timeout=600, capture_output=True, text=True, cwd=ROOT)
    finally:
        subprocess.run(cli + ["services", "down", *ports], env=env, timeout=120, capture_output=True)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    log = steps_log(tmp_path / "runs", "job")
    assert [r["step"] for r in log] == list(range(1, 41)) and {r["world"] for r in log} == {2}
    first = sum(r["loss"] for r in log[:10]) / 10
    last = sum(r["loss"] for r in log[-10:]) / 10
    assert last < first, (first, last)
    metrics = json.loads(next(l for l in job.stdout.splitlines() if l.startswith("metrics: "))[9:])
    # The same model before training, on the same held-out pairs.
    pairs = load_pairs(RefinedDataset.open(demo_shards).eval_sets()[0][0])
    cfg = tiny_cfg(tmp_path)
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    untrained = verify(TorchEmbedder(Trainee(cfg, manifest["num_classes"], 0, 1, torch.device("cpu"), MARGIN).backbone),
                       pairs)
    trained = metrics[f"{pairs.name}.accuracy"]
    assert trained > untrained["accuracy"], (trained, untrained["accuracy"])


def test_worker_dies_and_the_run_continues_from_the_checkpoint(tmp_path, demo_shards, ray_local, mlflow_server,
                                                               monkeypatch):
    import mlflow

    cfg = tiny_cfg(tmp_path, name="fault", max_steps=12, checkpoint_every=5, eval_every=0, max_failures=2)
    # Failure injection lives in the test (tests/step_hooks.py), not in the training loop.
    result = run_training(str(demo_shards), cfg, MARGIN, mlflow_uri=mlflow_server,
                          step_hook=f"{ROOT / 'tests' / 'step_hooks.py'}:fail_once_after_step_7")
    assert result.error is None
    log = steps_log(tmp_path / "runs", "fault")
    steps = [r["step"] for r in log]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10, 11, 12]  # died after 7, resumed from step 5
    # The resumed run is the same run: steps 6 and 7 again give the same losses.
    assert log[5]["loss"] == pytest.approx(log[7]["loss"], abs=1e-5)
    assert log[6]["loss"] == pytest.approx(log[8]["loss"], abs=1e-5)
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
    assert state["step"] == 12
    # Rank 0 logged to MLflow, and the resumed attempt kept logging into the same run.
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(state["mlflow_run_id"])
    assert run.data.params["train.backbone"] == cfg.backbone == "tiny-s2"  # configs/demo-train.toml
    assert run.data.params["data.content_hash"] == json.loads((demo_shards / "manifest.json").read_text())["content_hash"]
    assert run.data.tags["resumed_at_step"] == "5"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == 12 and {"lr", "samples_per_s"} <= set(run.data.metrics)


def test_shards_from_and_checkpoints_to_s3(tmp_path, demo_shards, s3_bucket, s3_endpoint, ray_local):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in demo_shards.rglob("*"):
        if path.is_file() and path.parent.name != "staging":
            client.upload_file(str(path), s3_bucket, f"data/{path.relative_to(demo_shards).as_posix()}")
    cfg = tiny_cfg(tmp_path, name="s3run", max_steps=4, checkpoint_every=2, eval_every=0)
    cfg.storage = f"s3://{s3_bucket}/runs"
    result = run_training(f"s3://{s3_bucket}/data", cfg, MARGIN)
    assert result.error is None
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/s3run/")["Contents"]]
    finals = [k for k in keys if k.endswith("state.json")]
    assert finals and any(k.endswith("backbone.pt") for k in keys)
    assert sum(k.rsplit("/", 1)[-1].startswith("centres-") for k in keys) >= 2 * len(finals)
    states = [json.loads(client.get_object(Bucket=s3_bucket, Key=k)["Body"].read()) for k in finals]
    assert max(s["step"] for s in states) == 4


def test_resume_on_request_from_a_checkpoint(tmp_path, demo_shards, ray_local):
    first = run_training(str(demo_shards), tiny_cfg(tmp_path, name="first", max_steps=4, checkpoint_every=4,
                                                    eval_every=0), MARGIN)
    assert first.error is None
    second = run_training(str(demo_shards), tiny_cfg(tmp_path, name="second", max_steps=6, checkpoint_every=2,
                                                     eval_every=0, workers=1), MARGIN,
                          resume=first.checkpoint.path)
    assert second.error is None
    log = steps_log(tmp_path / "runs", "second")
    assert [r["step"] for r in log] == [5, 6] and {r["world"] for r in log} == {1}  # and on 1 worker


def test_sphereface_trains_with_its_lambda_annealed(tmp_path, demo_shards, ray_local):
    """The loop calls the margin's per-step hook: SphereFace's lambda decays as its schedule
    says, and the loss falls."""
    from pipelines.training.config import MarginConfig

    margin = MarginConfig(type="sphereface", scale=32.0)
    cfg = tiny_cfg(tmp_path, name="sphere", max_steps=30, epochs=100, checkpoint_every=30, eval_every=0, workers=1,
                   warmup_steps=5)
    result = run_training(str(demo_shards), cfg, margin)
    assert result.error is None
    log = steps_log(tmp_path / "runs", "sphere")
    lam = [r["margin_lambda"] for r in log]
    p = margin.sphereface
    assert lam == pytest.approx([max(p.lambda_min, p.lambda_base * (1 + p.gamma * (r["step"] - 1)) ** -p.power)
                                 for r in log])
    assert lam[0] == 1000.0 and lam[-1] < 300.0
    first = sum(r["loss"] for r in log[:8]) / 8
    last = sum(r["loss"] for r in log[-8:]) / 8
    assert last < first, (first, last)
    with result.checkpoint.as_directory() as d:
        assert json.loads(Path(d, "state.json").read_text())["margin"]["type"] == "sphereface"

"""MLflow for real: a tracked training run, its registered model loaded elsewhere, gated promotion."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from arcface_core.backbones import build_backbone
from cleaning.holdout import split_holdout
from pipelines.config import load_config
from dataset import RefinedDataset
from pipelines.evaluate import evaluate, load_pairs, scalar_metrics, TorchEmbedder
from pipelines.training.driver import run_training


def eval_sets_of(data: str):
    return RefinedDataset.open(data).eval_sets()
from pipelines.models import load_embedder
from pipelines.registry import CHAMPION, PromotionRefused, lineage, log_embedding_model, promote, rollback

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.services
NAME = "faces"

# Runs in a fresh interpreter where this project cannot be imported: the registered model
# must stand on numpy, torch and mlflow alone.
LOAD_ELSEWHERE = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pipelines", "arcface_core", "cleaning", "dataset", "infra"):
                raise ImportError(f"project module {name} is not available here")
    sys.meta_path.insert(0, Block())
    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model(sys.argv[1])
    np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
""")


@pytest.fixture
def ray_local():
    import ray

    yield
    ray.shutdown()


def _register_untrained(data: str, seed: int, dim: int) -> str:
    """An untrained backbone logged and registered like a trained one (the weak candidate)."""
    torch.manual_seed(seed)
    backbone = build_backbone("tiny", dim).eval()
    figures = scalar_metrics(evaluate(TorchEmbedder(backbone), *eval_sets_of(data)))
    with mlflow.start_run(run_name=f"untrained-{seed}"):
        version = log_embedding_model(backbone, dim, NAME, figures, {"data.uri": data})
    return version.version


def test_tracked_run_registered_promoted_and_loaded_elsewhere(tmp_path, demo_shards, mlflow_server, ray_local,
                                                              monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    data = str(tmp_path / "data")
    manifest = split_holdout(RefinedDataset.open(demo_shards), RefinedDataset.create(data), identities=4, pairs=60,
                             seed=1).manifest.to_dict()
    full = load_config(ROOT / "configs" / "demo-train.toml")
    cfg = full.train
    cfg.storage, cfg.name, cfg.max_steps, cfg.epochs = str(tmp_path / "runs"), "reg", 40, 50
    cfg.checkpoint_every, cfg.eval_every, cfg.registered_model = 40, 0, NAME

    # v1: an untrained model becomes the first champion.
    v1 = _register_untrained(data, seed=11, dim=cfg.embedding_size)
    first = promote(NAME, v1)
    assert first.promoted and "first champion" in first.message

    # v2: a tracked training run registers its model with evaluation and lineage.
    result = run_training(data, cfg, full.margin, mlflow_uri=mlflow_server)
    assert result.error is None
    v2 = str(max(int(v.version) for v in client.search_model_versions(f"name='{NAME}'")))
    version = client.get_model_version(NAME, v2)
    run = client.get_run(version.run_id)
    assert run.data.params["train.backbone"] == cfg.backbone and run.data.params["data.uri"] == data
    assert run.data.params["data.content_hash"] == manifest["content_hash"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config.json", "plots/roc.png", "plots/loss.png"} <= artifacts
    pair_names = [load_pairs(u).name for u in eval_sets_of(data)[0]]
    assert len(pair_names) == 2
    for name in pair_names:
        assert f"eval.{name}.accuracy" in version.tags and f"eval.{name}.accuracy" in run.data.metrics
    assert any(k.endswith(".rank1") for k in version.tags)
    assert version.tags["data.content_hash"] == manifest["content_hash"]

    # The trained model beats the untrained champion: the alias moves, both figures recorded.
    decision = promote(NAME, v2)
    assert decision.promoted, decision.message
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_version"] == v1
    assert float(tags["promotion.candidate_value"]) > float(tags["promotion.champion_value"])
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v2

    # Loaded by alias in a separate process without this project: the same embeddings.
    faces = load_pairs(eval_sets_of(data)[0][0]).faces[:16]
    np.save(tmp_path / "faces.npy", faces)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, f"models:/{NAME}@{CHAMPION}",
                           str(tmp_path / "faces.npy"), str(tmp_path / "out.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = np.load(tmp_path / "out.npy")
    in_process = load_embedder(result.checkpoint.path).embedder(faces, True)
    assert elsewhere.shape == (16, cfg.embedding_size)
    np.testing.assert_allclose(elsewhere, in_process, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(elsewhere, axis=1), 1.0, atol=1e-5)

    # v3, untrained again, evaluated now on the same sets as the champion: refused, and says why.
    v3 = _register_untrained(data, seed=12, dim=cfg.embedding_size)
    refused = promote(NAME, v3, pair_uris=eval_sets_of(data)[0])
    assert not refused.promoted and "does not beat" in refused.message and f"champion v{v2}" in refused.message
    tags = client.get_model_version(NAME, v3).tags
    assert tags["promotion.decision"] == "refused"
    assert float(tags["promotion.candidate_value"]) < float(tags["promotion.champion_value"])
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v2
    # A margin the trained model cannot clear over itself is refused too.
    with pytest.raises(PromotionRefused, match="no evaluation set"):
        promote(NAME, v3, metric="no_such_metric")

    # Lineage from the registered version back to run, config and exact dataset.
    info = lineage(NAME, CHAMPION)
    assert info["run_id"] == version.run_id and info["config"]["backbone"] == cfg.backbone == "tiny-s2"
    assert info["dataset"] == {"uri": data, "content_hash": manifest["content_hash"]}

    # Roll back: the champion returns to the version v2 replaced.
    assert rollback(NAME).message.endswith(f"to v{v1}")
    assert client.get_model_version_by_alias(NAME, CHAMPION).version == v1

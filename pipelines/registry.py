"""Models in MLflow: log and register a trained embedder, record evaluations on a version,
promote with a gate, roll back, and trace a version back to its run and dataset (loading a
model by URI is pipelines/models.py's).

A registered version carries, as tags:
  eval.<set>.<metric>   its evaluation (set = file stem + SHA-256 prefix, see evaluate.py)
  data.uri, data.content_hash, train.config, code.version   lineage
  promotion.*           the last promotion decision about it, with both figures
The `champion` alias (registry aliases, not the deprecated stages) names the version in use.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arcface_core.embedder import AlignedFaceEmbedder
from pipelines.models import resolve_version

log = logging.getLogger(__name__)

CHAMPION = "champion"
SERVING_FILE = Path(__file__).with_name("serving_model.py")


# -- logging a model ----------------------------------------------------------------------

def export_program(backbone: torch.nn.Module, path: str) -> None:
    """torch.export the uint8-in embedder (eval mode, CPU, any batch size) to `path`."""
    import copy

    model = AlignedFaceEmbedder(copy.deepcopy(backbone).cpu().float().eval()).eval()
    example = torch.zeros((2, 112, 112, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes={"faces": {0: batch}})
    torch.export.save(program, path)


def _signature(embedding_size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 112, 112, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedding_size))]),
        params=ParamSchema([ParamSpec("flip", "boolean", True), ParamSpec("batch_size", "long", 256)]),
    )


def _requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]


def log_embedding_model(backbone: torch.nn.Module, embedding_size: int, registered_name: str,
                        evaluation: dict[str, float], lineage: dict[str, str]):
    """Log the model into the active run and register it; returns the ModelVersion."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        program = os.path.join(tmp, "program.pt2")
        export_program(backbone, program)
        info = mlflow.pyfunc.log_model(
            name="embedder", python_model=str(SERVING_FILE), artifacts={"program": program},
            signature=_signature(embedding_size), pip_requirements=_requirements(),
            registered_model_name=registered_name or None,
            metadata={"input": "aligned 112x112 RGB uint8 faces (ArcFace template)", "output": "L2-normalised"})
    if not registered_name:
        return None
    client = mlflow.MlflowClient()
    version = client.get_model_version(registered_name, str(info.registered_model_version))
    tags = {**{f"eval.{k}": f"{v:.6g}" for k, v in evaluation.items()}, **lineage}
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version.version, key, str(value)[:5000])
    client.update_model_version(registered_name, version.version, description=(
        f"ArcFace embedder from run {version.run_id}; data {lineage.get('data.uri', '?')} "
        f"(content hash {lineage.get('data.content_hash', '?')[:12]})"))
    return version


# -- promotion ----------------------------------------------------------------------------

class PromotionRefused(RuntimeError):
    pass


def recorded_evaluation(version) -> dict[str, float]:
    return {k[len("eval."):]: float(v) for k, v in version.tags.items() if k.startswith("eval.")}


def _common_figure(candidate: dict[str, float], champion: dict[str, float], metric: str) -> tuple[float, float, list]:
    """Mean of `metric` over the evaluation sets both versions were measured on."""
    def sets_of(figures: dict[str, float]) -> set[str]:  # metric names may hold dots (tar_at_far_0.01)
        return {k[:-len(metric) - 1] for k in figures if k.endswith("." + metric)}

    sets = sorted(sets_of(candidate) & sets_of(champion))
    if not sets:
        raise PromotionRefused(
            f"no evaluation set with '{metric}' was measured on both versions (candidate: "
            f"{sorted(candidate) or 'none'}; champion: {sorted(champion) or 'none'}); evaluate both on the same "
            "sets with `arcface promote ... --pairs FILE`")
    return (float(np.mean([candidate[f"{s}.{metric}"] for s in sets])),
            float(np.mean([champion[f"{s}.{metric}"] for s in sets])), sets)


def evaluate_version(client, name: str, version: str, pair_uris: list[str], face_uris: list[str],
                     workers: int = 0, gpu: bool = False, ray_address: str = "") -> dict[str, float]:
    """Evaluate a registered version now and record the figures on it as tags; its faces
    embedded in this process (`workers=0`) or by `workers` Ray actors (one GPU each with `gpu`)."""
    from pipelines.eval_workers import embedding_workers
    from pipelines.evaluate import evaluate, scalar_metrics

    with embedding_workers(f"models:/{name}/{version}", workers=workers, gpu=gpu, ray_address=ray_address) as runner:
        figures = scalar_metrics(evaluate(runner, pair_uris, face_uris))
    for key, value in figures.items():
        client.set_model_version_tag(name, version, f"eval.{key}", f"{value:.6g}")
    return {k: float(f"{v:.6g}") for k, v in figures.items()}


def record_evaluation(model_uri: str, results: dict[str, dict], client=None) -> str:
    """Figures measured now (e.g. an IJB evaluation) as `eval.*` tags of the registered
    version (what `promote --metric` gates on) and as metrics of its run, plus the ROC."""
    import mlflow

    from pipelines.evaluate import roc_png, scalar_metrics

    client = client or mlflow.MlflowClient()
    version = resolve_version(model_uri, client)
    figures = scalar_metrics(results)
    for key, value in figures.items():
        client.set_model_version_tag(version.name, version.version, f"eval.{key}", f"{value:.6g}")
        client.log_metric(version.run_id, f"eval.{key}", value)
    png = roc_png(results, title=model_uri)
    if png:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"roc-{'-'.join(results)}.png")
            with open(path, "wb") as fh:
                fh.write(png)
            client.log_artifact(version.run_id, path, "plots")
    return f"{version.name} v{version.version}"


@dataclass
class Decision:
    promoted: bool
    message: str
    candidate: float | None = None
    champion: float | None = None
    previous_version: str | None = None
    version: str = ""  # the candidate
    champion_version: str = ""  # who holds the alias after the decision
    figures: dict | None = None  # the candidate's recorded evaluation


def promote(name: str, version: str, metric: str = "accuracy", min_delta: float = 0.0,
            pair_uris: list[str] = (), face_uris: list[str] = (), client=None, workers: int = 0, gpu: bool = False,
            ray_address: str = "") -> Decision:
    """Move `champion` to `version` only if it beats the current champion by at least
    `min_delta` on `metric` (mean over the evaluation sets both were measured on; with
    `min_delta` 0 it must be strictly better). The first version becomes champion. The
    decision and both figures are recorded as tags on the candidate. With sets given, both
    versions are evaluated on them first (`workers`, `gpu`, `ray_address`: as `evaluate_version`)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    if str(version) == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise PromotionRefused(f"{name}: no registered versions")
        version = str(max(int(v.version) for v in versions))
    candidate = client.get_model_version(name, str(version))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    if pair_uris or face_uris:
        on = {"workers": workers, "gpu": gpu, "ray_address": ray_address}
        evaluate_version(client, name, candidate.version, list(pair_uris), list(face_uris), **on)
        if current is not None and current.version != candidate.version:
            evaluate_version(client, name, current.version, list(pair_uris), list(face_uris), **on)
        candidate = client.get_model_version(name, candidate.version)
        current = client.get_model_version(name, current.version) if current else None
    cand_eval = recorded_evaluation(candidate)
    tags = {"promotion.metric": metric, "promotion.min_delta": f"{min_delta:g}",
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if current is None:
        figures = [v for k, v in cand_eval.items() if k.endswith("." + metric)]
        value = float(np.mean(figures)) if figures else None
        decision = Decision(True, f"{name} v{candidate.version} is the first champion", value, None, None)
    elif current.version == candidate.version:
        return Decision(False, f"{name} v{candidate.version} is already the champion", version=candidate.version,
                        champion_version=current.version, figures=cand_eval)
    else:
        try:
            cand, champ, sets = _common_figure(cand_eval, recorded_evaluation(current), metric)
        except PromotionRefused as exc:
            _tag(client, name, candidate.version, {**tags, "promotion.decision": "refused",
                                                   "promotion.reason": str(exc)[:4000]})
            raise
        delta = cand - champ
        better = delta > 0 and delta >= min_delta
        word = "beats" if better else "does not beat"
        message = (f"{name} v{candidate.version} {word} champion v{current.version} on {metric} over {len(sets)} "
                   f"set(s) {', '.join(sets)}: {cand:.4f} vs {champ:.4f} (delta {delta:+.4f}, required "
                   f"{'> 0' if min_delta <= 0 else f'>= {min_delta:g}'})")
        decision = Decision(better, message, cand, champ, current.version)
        tags.update({"promotion.champion_version": current.version, "promotion.champion_value": f"{champ:.6g}",
                     "promotion.sets": ",".join(sets)})
    tags.update({"promotion.decision": "promoted" if decision.promoted else "refused",
                 "promotion.reason": decision.message})
    if decision.candidate is not None:
        tags["promotion.candidate_value"] = f"{decision.candidate:.6g}"
    if decision.promoted:
        if current is not None:
            tags["promotion.previous_champion"] = current.version
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    _tag(client, name, candidate.version, tags)
    decision.version, decision.figures = candidate.version, cand_eval
    decision.champion_version = candidate.version if decision.promoted else (current.version if current else "")
    return decision


def _tag(client, name, version, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def rollback(name: str, client=None) -> Decision:
    """Move `champion` back to the version it replaced (recorded at promotion)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    current = client.get_model_version_by_alias(name, CHAMPION)
    previous = current.tags.get("promotion.previous_champion")
    if not previous:
        raise PromotionRefused(f"{name} v{current.version} replaced no earlier champion; nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    _tag(client, name, current.version, {"promotion.rolled_back": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return Decision(True, f"{name}: champion moved back from v{current.version} to v{previous}",
                    previous_version=current.version)


def lineage(name: str, version_or_alias: str, client=None) -> dict:
    """From a registered version to its run, training config and exact dataset."""
    import mlflow

    client = client or mlflow.MlflowClient()
    if version_or_alias.isdigit():
        version = client.get_model_version(name, version_or_alias)
    else:
        version = client.get_model_version_by_alias(name, version_or_alias)
    run = client.get_run(version.run_id) if version.run_id else None
    params = run.data.params if run else {}
    return {
        "model": f"models:/{name}/{version.version}", "aliases": list(version.aliases),
        "run_id": version.run_id, "experiment_id": run.info.experiment_id if run else None,
        "dataset": {"uri": version.tags.get("data.uri") or params.get("data.uri"),
                    "content_hash": version.tags.get("data.content_hash") or params.get("data.content_hash")},
        "code_version": version.tags.get("code.version") or params.get("code.version"),
        "config": {k[len("train."):]: v for k, v in params.items() if k.startswith("train.")},
        "evaluation": recorded_evaluation(version),
        "promotion": {k: v for k, v in version.tags.items() if k.startswith("promotion.")},
    }

"""`arcface denoise`: refinement stage 2 on Ray, and `arcface refine`: the paper's loop.

Stage 2: embed a stage-1 dataset with a model (Ray actors, pipelines/embed.py), then the
cleaning/denoise.py steps in order: intra-class outliers (label noise) -> merge identities
whose centres coincide -> drop identities that overlap the evaluation sets -> drop
identities left too small; relabel contiguously and write a new refined dataset (shards,
rejects of both stages, manifest, report). kept + rejected = read still holds.

Refine: stage 1 (Dask) -> train a bootstrap model on it (Ray Train) -> stage 2 with that
model -> optionally retrain on the refined data. Each step is skipped when its output
exists, so a rerun continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time

import numpy as np

from cleaning import rewrite, shards, storage
from cleaning.denoise import (EmbeddedSet, EvaluationOverlap, IntraClassOutliers, MergeIdentities, SmallIdentities,
                              contiguous_labels)
from pipelines.config import Config, DenoiseConfig

log = logging.getLogger(__name__)

STAGE = "stage2"


def load_model_centres(checkpoint: str) -> np.ndarray:
    """The class centres of a training checkpoint as (C, K, D), from its per-rank files."""
    import io
    import json

    import torch

    state = json.loads(storage.read_bytes(storage.join(checkpoint, "state.json")))
    k = int(state["config"]["subcentres"])
    parts = []
    for uri in storage.list_files(checkpoint, ".pt", recursive=False):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("centres-"):
            lo = int(name[8:-3].split("-")[0])
            blob = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
            parts.append((lo, blob["weight"].float().numpy()))
    if not parts:
        raise ValueError(f"{checkpoint}: no centres-*.pt files (model centres need a training checkpoint)")
    weight = np.concatenate([w for _, w in sorted(parts, key=lambda p: p[0])])
    return weight.reshape(-1, k, weight.shape[1])


def evaluation_faces(data: str) -> np.ndarray:
    """Every distinct face of the evaluation sets that come with the dataset, uint8 NHWC."""
    from pipelines.evaluate import eval_sets_of, load_faces, load_pairs

    pair_uris, face_uris = eval_sets_of(data)
    faces = [load_pairs(u).faces for u in pair_uris] + [load_faces(u).faces for u in face_uris]
    if not faces:
        return np.zeros((0, 112, 112, 3), np.uint8)
    stacked = np.concatenate(faces)
    digests = [hashlib.sha1(f.tobytes()).digest() for f in stacked]
    _, first = np.unique(np.array(digests, dtype=object), return_index=True)
    return stacked[np.sort(first)]


def _read_names(path: str) -> set[str]:
    if not path:
        return set()
    text = storage.read_bytes(path).decode()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def run_denoise(data: str, out: str, model_uri: str, cfg: DenoiseConfig) -> dict:
    from pipelines.embed import embed_dataset, read_embeddings
    from pipelines.registry import load_embedder

    started = time.perf_counter()
    if not storage.is_s3(out):
        out = os.path.abspath(out)
    if not storage.is_s3(data):
        data = os.path.abspath(data)
    embed_dataset(data, model_uri, workers=cfg.workers, gpu=cfg.gpu, batch=cfg.batch)
    emb, keys, sizes = read_embeddings(data, model_uri)
    parent = rewrite.read_manifest(data)
    labels, identities, shard_keys = [], [], []
    for uri in rewrite.shard_uris(data, parent):
        t = shards.read_table(uri, columns=["key", "label", "identity"])
        labels += t.column("label").to_pylist()
        identities += t.column("identity").to_pylist()
        shard_keys += t.column("key").to_pylist()
    if shard_keys != keys:
        raise RuntimeError(f"{data}: embeddings are out of step with the shards; delete {data}/embeddings and rerun")
    eval_faces = evaluation_faces(data)
    eval_emb = load_embedder(model_uri).embedder(eval_faces, True) if len(eval_faces) else None
    centres = load_model_centres(model_uri) if cfg.use_model_centres else None

    embedded = EmbeddedSet(emb, np.asarray(labels, np.int64), np.asarray(identities, object))
    steps = [IntraClassOutliers(cfg.max_angle, cfg.min_images_to_judge, model_centres=centres),
             MergeIdentities(cfg.merge_max_angle),
             EvaluationOverlap(eval_emb, cfg.overlap_max_angle, cfg.overlap_min_faces, _read_names(cfg.exclude_identities)),
             SmallIdentities(cfg.min_images_per_identity)]
    for step in steps:
        step(embedded)
        log.info("%s: %s", step.name, step.counts())
    new_labels, id_map = contiguous_labels(embedded)

    offsets = dict(zip(parent["shards"], np.cumsum([0] + sizes[:-1]).tolist()))

    def decide(name: str, table) -> rewrite.ShardDecision:
        lo = offsets[name]
        hi = lo + table.num_rows
        return rewrite.ShardDecision(new_labels[lo:hi], list(embedded.reasons[lo:hi]), list(embedded.details[lo:hi]))

    angles = embedded.angles
    judged = np.isfinite(angles)
    outlier = embedded.reasons == f"{steps[0].name}/{steps[0].reasons[0]}"
    other = ~embedded.kept & ~outlier
    edges = np.linspace(0, 180, 91)
    summary = {
        "model": model_uri, "config": dataclasses.asdict(cfg), "embedding_dim": int(emb.shape[1]),
        "steps": {s.name: s.counts() for s in steps},
        "merges": [dataclasses.asdict(m) for m in steps[1].merges],
        "evaluation_faces": int(len(eval_faces)),
        "angle_histogram": {"edges_deg": edges.tolist(),
                            "kept": np.histogram(angles[judged & embedded.kept], edges)[0].tolist(),
                            "dropped": np.histogram(angles[judged & outlier], edges)[0].tolist(),
                            "dropped_other_reasons": np.histogram(angles[judged & other], edges)[0].tolist(),
                            "threshold_deg": cfg.max_angle},
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)  # embedding and decisions
    manifest = rewrite.rewrite_dataset(data, out, decide, id_map, stage=STAGE, extra={STAGE: summary})
    try:
        from cleaning.report import write_denoise_report

        write_denoise_report(out, manifest, embedded, keys)
    except Exception:  # the report is a view; the dataset stands without it
        log.exception("report failed")
    _track(manifest, out)
    return manifest


def _track(manifest: dict, out: str) -> None:
    """Log the refinement to MLflow when a tracking server is configured."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("refinement")
    s = manifest[STAGE]
    with mlflow.start_run(run_name=f"denoise {out.rstrip('/').rsplit('/', 1)[-1]}"):
        mlflow.log_params({f"denoise.{k}": v for k, v in s["config"].items()})
        mlflow.log_params({"model": s["model"], "data.parent": manifest["parent"]["uri"], "data.out": out,
                           "data.content_hash": manifest["content_hash"]})
        c = manifest["counts"]
        mlflow.log_metrics({"read": c["read"], "kept": c["kept"], "rejected": c["rejected"],
                            "num_classes": manifest["num_classes"],
                            **{f"rejected.{k.replace('/', '.')}": v for k, v in c["by_reason"].items()}})
        mlflow.log_dict({k: v for k, v in manifest.items() if k != "identity_to_label"}, "manifest.json")
        if storage.exists(storage.join(out, "report", "index.html")) and not storage.is_s3(out):
            mlflow.log_artifacts(os.path.join(out, "report"), "report")


# -- the loop -------------------------------------------------------------------------------

def run_refine(input_uri: str, fmt: str, out: str, cfg: Config, scheduler: str | None = None) -> dict:
    """stage 1 -> bootstrap model -> stage 2 (-> retrain). Returns a summary."""
    from pipelines.clean_data import run_clean_data
    from pipelines.train import run_training

    if not storage.is_s3(out):
        out = os.path.abspath(out)
    stage1, stage2 = storage.join(out, "stage1"), storage.join(out, "stage2")
    runs = storage.join(out, "runs")
    summary: dict = {"stage1": stage1, "stage2": stage2}
    if not storage.exists(storage.join(stage1, "manifest.json")):
        run_clean_data(input_uri, fmt, stage1, cfg, scheduler=scheduler)
    else:
        log.info("stage 1 done before: %s", stage1)
    marker = storage.join(out, "bootstrap.json")  # written once the bootstrap model is complete
    if storage.exists(marker):
        bootstrap = shards.read_json(marker)["checkpoint"]
    else:
        boot = dataclasses.replace(cfg.train, name="bootstrap", storage=runs, epochs=cfg.denoise.bootstrap_epochs,
                                   max_steps=0, registered_model="", eval_every=0)
        result = run_training(stage1, boot)
        if result.error:
            raise RuntimeError(f"bootstrap training failed: {result.error}")
        bootstrap = result.checkpoint.path
        if storage.is_s3(runs) and not bootstrap.startswith("s3://"):
            bootstrap = "s3://" + bootstrap
        shards.write_json(marker, {"checkpoint": bootstrap, "config": dataclasses.asdict(boot)})
    summary["bootstrap_checkpoint"] = bootstrap
    if not storage.exists(storage.join(stage2, "manifest.json")):
        run_denoise(stage1, stage2, bootstrap, cfg.denoise)
    summary["manifest"] = rewrite.read_manifest(stage2)
    if cfg.denoise.retrain:
        final = dataclasses.replace(cfg.train, name="refined", storage=runs)
        result = run_training(stage2, final)
        if result.error:
            raise RuntimeError(f"training on the refined data failed: {result.error}")
        summary["refined_checkpoint"] = result.checkpoint.path
    return summary

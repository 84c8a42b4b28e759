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
import time
from dataclasses import dataclass

import numpy as np

from cleaning import rewrite
from cleaning.denoise import (EmbeddedSet, EvaluationOverlap, IntraClassOutliers, MergeIdentities, SmallIdentities,
                              contiguous_labels)
from dataset import shards, storage
from dataset.refined import RefinedDataset, locations_overlap, real_location
from pipelines.denoise_config import DenoiseConfig  # noqa: F401  (the section this job reads)

log = logging.getLogger(__name__)

STAGE = "stage2"
REFINE_LAYOUT = {"stage1": "stage1", "stage2": "stage2", "runs": "runs", "bootstrap": "bootstrap.json"}


def evaluation_faces(data: RefinedDataset) -> np.ndarray:
    """Every distinct face of the evaluation sets that come with the dataset, uint8 NHWC."""
    from pipelines.evaluate import load_faces, load_pairs

    pair_uris, face_uris = data.eval_sets()
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


def _embedded(data: RefinedDataset, model_uri: str, cfg: DenoiseConfig, ray_address: str) -> tuple:
    """(EmbeddedSet of every face in shard-row order, faces per shard); embeddings are
    computed once per model and reused (STAGE1/embeddings/<model hash>/), and read from
    there shard by shard by each pass of the steps, never held whole."""
    import pyarrow as pa

    from pipelines.embed import embed_dataset, open_embeddings

    embed_dataset(data, model_uri, workers=cfg.workers, gpu=cfg.gpu, batch=cfg.batch, ray_address=ray_address)
    if cfg.pass_tasks > 1:
        from pipelines.ray_connect import connect

        connect(ray_address, num_cpus=max(2, cfg.pass_tasks))
    emb = open_embeddings(data, model_uri, parallel=cfg.pass_tasks)
    labels, identities = [], []
    for uri in data.shard_uris():
        t = shards.read_table(uri, columns=["label", "identity"])
        labels.append(t.column("label").to_numpy())
        identities.append(t.column("identity"))
    # One string object per identity, not per face (85K, not 5.8M, at MS1MV2's size).
    encoded = pa.chunked_array(identities, pa.string()).combine_chunks().dictionary_encode() if identities else None
    names = (np.asarray(encoded.dictionary.to_pylist(), object)[encoded.indices.to_numpy()] if encoded is not None
             else np.zeros(0, object))
    groups = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    return EmbeddedSet(emb, groups, names), emb.sizes


def noise_share(embedded: EmbeddedSet, model_uri: str, cfg: DenoiseConfig) -> float:
    """The share of the judged faces that `model_uri` (whose embeddings `embedded` holds)
    finds mislabelled: the intra-class step alone, on a copy; nothing is written."""
    from pipelines.training import checkpoint

    centres = checkpoint.read_all_centres(model_uri) if cfg.use_model_centres else None
    step = IntraClassOutliers(cfg.max_angle, cfg.min_images_to_judge, model_centres=centres)
    step(EmbeddedSet(embedded.embeddings, embedded.groups.copy(), embedded.identities))
    return sum(step.dropped.values()) / max(1, step.figures["judged_faces"])


def run_denoise(data: RefinedDataset, out: RefinedDataset, model_uri: str, cfg: DenoiseConfig,
                ray_address: str = "", mlflow_uri: str = "", drop_overlap: bool = True,
                loaded: tuple | None = None) -> RefinedDataset:
    """Stage 2 of `data` into `out` with the model `model_uri`. `drop_overlap` False keeps the
    evaluation-overlap identities (an intermediate round: the next round's bootstrap must
    learn them like any other identity, or it cannot recognise them in the evaluation set).
    `loaded`: what `_embedded` returned for this data and model, when the caller has it."""
    from pipelines.models import load_embedder
    from pipelines.training import checkpoint

    check_denoise_output(data, out, model_uri)  # before anything is computed or written
    started = time.perf_counter()
    embedded, sizes = loaded or _embedded(data, model_uri, cfg, ray_address)
    eval_faces = evaluation_faces(data)
    eval_emb = load_embedder(model_uri).embedder(eval_faces, True) if len(eval_faces) else None
    centres = checkpoint.read_all_centres(model_uri) if cfg.use_model_centres else None

    outliers = IntraClassOutliers(cfg.max_angle, cfg.min_images_to_judge, model_centres=centres)
    merges = MergeIdentities(cfg.merge_max_angle, same_person_angle=cfg.merge_same_person_angle)
    overlap = [EvaluationOverlap(eval_emb, cfg.overlap_max_angle, cfg.overlap_min_faces,
                                 _read_names(cfg.exclude_identities))] if drop_overlap else []
    steps = [outliers, merges, *overlap, SmallIdentities(cfg.min_images_per_identity)]  # in this order
    for step in steps:
        step(embedded)
        log.info("%s: %s", step.name, step.counts())
    new_labels, id_map = contiguous_labels(embedded)

    offsets = dict(zip(data.manifest.shards, np.cumsum([0] + sizes[:-1]).tolist()))

    def decide(name: str, table) -> rewrite.ShardDecision:
        lo = offsets[name]
        hi = lo + table.num_rows
        return rewrite.ShardDecision(new_labels[lo:hi], list(embedded.reasons[lo:hi]), list(embedded.details[lo:hi]))

    angles = embedded.angles
    judged = np.isfinite(angles)
    outlier = embedded.reasons == f"{outliers.name}/{outliers.reasons[0]}"
    other = ~embedded.kept & ~outlier
    edges = np.linspace(0, 180, 91)
    summary = {
        "model": model_uri, "config": dataclasses.asdict(cfg), "drop_overlap": drop_overlap,
        "embedding_dim": int(embedded.embeddings.dim),
        "steps": {s.name: s.counts() for s in steps},
        "merges": [dataclasses.asdict(m) for m in merges.merges],
        "merge_candidates": merges.candidates,
        "evaluation_faces": int(len(eval_faces)),
        "angle_histogram": {"edges_deg": edges.tolist(),
                            "kept": np.histogram(angles[judged & embedded.kept], edges)[0].tolist(),
                            "dropped": np.histogram(angles[judged & outlier], edges)[0].tolist(),
                            "dropped_other_reasons": np.histogram(angles[judged & other], edges)[0].tolist(),
                            "threshold_deg": outliers.threshold},
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)  # embedding and decisions
    rewrite.rewrite_dataset(data, out, decide, id_map, stage=STAGE, extra={STAGE: summary})
    try:
        from cleaning.report import write_denoise_report

        write_denoise_report(out, embedded)
    except Exception:  # the report is a view: the dataset stands without it, but no index
        # means no report (a stale one from an earlier run must not pass for this one's),
        # and the commands exit non-zero.
        log.exception("the report of %s failed", out.uri)
        storage.delete(out.report_index)
    if mlflow_uri:
        _track(out, mlflow_uri)
    return out


def check_denoise_output(data: RefinedDataset, out: RefinedDataset, model_uri: str) -> None:
    """--out must be neither inside nor around the dataset or the model it reads (links
    resolved), and hold nothing that is not a dataset of ours."""
    from pipelines.clean_data import OutputRefused

    inputs = [("--data", data.uri)]
    if storage.is_s3(model_uri) or "://" not in model_uri and not model_uri.startswith(("models:", "runs:")):
        inputs.append(("--model", model_uri))  # a file or folder (not an MLflow registry name)
    for flag, uri in inputs:
        if locations_overlap(uri, out.uri):
            raise OutputRefused(f"--out {out.uri} and {flag} {uri} overlap (one holds the other, links resolved: "
                                f"{real_location(out.uri)}): write the output elsewhere")
    foreign = out.foreign_files()
    if foreign:
        raise OutputRefused(f"--out {out.uri} holds {len(foreign)} files that are not a dataset of ours "
                            f"(e.g. {foreign[0]}): choose an empty folder")


def _track(out: RefinedDataset, mlflow_uri: str) -> None:
    """Log the refinement to MLflow's `refinement` experiment."""
    import mlflow

    manifest = out.manifest.to_dict()
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("refinement")
    s = manifest[STAGE]
    with mlflow.start_run(run_name=f"denoise {storage.name(out.uri)}"):
        mlflow.log_params({f"denoise.{k}": v for k, v in s["config"].items()})
        mlflow.log_params({"model": s["model"], "data.parent": manifest["parent"]["uri"], "data.out": out.uri,
                           "data.content_hash": manifest["content_hash"]})
        c = manifest["counts"]
        mlflow.log_metrics({"read": c["read"], "kept": c["kept"], "rejected": c["rejected"],
                            "num_classes": manifest["num_classes"],
                            **{f"rejected.{k.replace('/', '.')}": v for k, v in c["by_reason"].items()}})
        mlflow.log_dict(out.manifest.summary(), "manifest_summary.json")
        if storage.exists(out.report_index) and not storage.is_s3(out.uri):
            mlflow.log_artifacts(out.report_folder, "report")


# -- the loop -------------------------------------------------------------------------------

@dataclass
class RefineResult:
    stage1: RefinedDataset
    stage2: RefinedDataset
    bootstrap_checkpoint: str
    refined_checkpoint: str = ""


def _stage2_current(stage2: RefinedDataset, stage1: RefinedDataset, model: str, cfg: DenoiseConfig,
                    drop_overlap: bool = True) -> bool:
    """Whether a finished stage 2 was made from this stage 1, by this model, with this config."""
    if not stage2.is_complete():
        return False
    m = stage2.manifest
    made = m.extra.get(STAGE, {})
    return ((m.parent or {}).get("content_hash") == stage1.content_hash and made.get("model") == model
            and made.get("config") == dataclasses.asdict(cfg) and made.get("drop_overlap", True) == drop_overlap)


def run_refine(input_uri: str, fmt: str, out: str, cfg, scheduler: str | None = None,
               overwrite: bool = False) -> RefineResult:
    """stage 1 -> bootstrap model -> stage 2 (-> retrain), under `out`:
    stage1/ (a refined dataset), runs/ (checkpoints), bootstrap.json (which checkpoint the
    bootstrap model is, written once it is complete), stage2/ (the refined dataset); with
    `denoise.rounds` n > 1 also round1/ .. round{n-1}/ (each round's output, which trains the
    next round's model: bootstrap2.json ..), and stage2/ is judged by the last model.
    `cfg` is the whole Config: the loop runs every stage."""
    from pipelines.clean_data import run_clean_data
    from pipelines.training.driver import run_training

    out = storage.absolute(out)
    storage.check_bucket(out)
    stage1 = RefinedDataset.create(storage.join(out, REFINE_LAYOUT["stage1"]))
    stage2 = RefinedDataset.create(storage.join(out, REFINE_LAYOUT["stage2"]))
    runs = storage.join(out, REFINE_LAYOUT["runs"])
    services = cfg.services
    # A rerun reuses each step's output only when it was made from the same inputs and
    # config: stage 1 per partition (fingerprints), the bootstrap model and stage 2 by record.
    stage1 = run_clean_data(input_uri, fmt, stage1, cfg.clean, scheduler=scheduler, overwrite=overwrite)
    boot = dataclasses.replace(cfg.train, name="bootstrap", storage=runs, epochs=cfg.denoise.bootstrap_epochs,
                               max_steps=0, registered_model="", eval_every=0,
                               subcentres=cfg.denoise.bootstrap_subcentres)
    denoise_cfg = cfg.denoise
    stage1 = RefinedDataset.open(stage1.uri)
    model = _bootstrap(stage1, boot, cfg, storage.join(out, REFINE_LAYOUT["bootstrap"]))
    summary = RefineResult(stage1, stage2, model)
    loaded = None  # the current model's embeddings, read once for its check and its stage 2
    for later in range(2, cfg.denoise.rounds + 1):
        loaded = _embedded(stage1, model, denoise_cfg, services.ray_address)
        share = noise_share(loaded[0], model, denoise_cfg)
        if share < cfg.denoise.another_round_above:
            log.info("round %d found %.1f%% of the faces mislabelled (< %.0f%%): no further round", later - 1,
                     100 * share, 100 * cfg.denoise.another_round_above)
            break
        log.info("round %d found %.1f%% of the faces mislabelled: a model trained on what it kept judges again",
                 later - 1, 100 * share)
        # Round n-1's output, judged by round n-1's model, trains round n's model; each
        # round judges every stage-1 face again, so a face dropped wrongly can come back.
        earlier = RefinedDataset.create(storage.join(out, f"round{later - 1}"))
        if not _stage2_current(earlier, stage1, model, denoise_cfg, drop_overlap=False):
            # Overlap identities stay in: dropped here, the next bootstrap would never learn
            # them and would miss their evaluation faces (one of 3 missed at 20% noise).
            run_denoise(stage1, earlier, model, denoise_cfg, ray_address=services.ray_address, drop_overlap=False,
                        loaded=loaded)
        loaded = None  # the next model embeds anew
        boot = dataclasses.replace(boot, name=f"bootstrap{later}")
        # The new model's classes are round n-1's labels, not stage 1's: centres from embeddings.
        denoise_cfg = dataclasses.replace(denoise_cfg, use_model_centres=False)
        model = _bootstrap(RefinedDataset.open(earlier.uri), boot, cfg, storage.join(out, f"bootstrap{later}.json"))
    summary.bootstrap_checkpoint = model
    if not _stage2_current(stage2, stage1, model, denoise_cfg):
        run_denoise(stage1, stage2, model, denoise_cfg, ray_address=services.ray_address,
                    mlflow_uri=services.mlflow_tracking_uri, loaded=loaded)
    del loaded  # N x D: not held through the retraining below
    summary.stage2 = RefinedDataset.open(stage2.uri)
    if cfg.denoise.retrain:
        final = dataclasses.replace(cfg.train, name="refined", storage=runs)
        result = run_training(summary.stage2, final, cfg.margin, ray_address=services.ray_address,
                              mlflow_uri=services.mlflow_tracking_uri)
        if result.error:
            raise RuntimeError(f"training on the refined data failed: {result.error}")
        summary.refined_checkpoint = result.checkpoint.path
    return summary


def _bootstrap(data: RefinedDataset, boot, cfg, marker: str) -> str:
    """The checkpoint of a bootstrap model trained on `data` with recipe `boot`: the one the
    marker names when it was made from the same data and recipe, else a new one."""
    from pipelines.training.driver import run_training

    made_from = {"config": dataclasses.asdict(boot), "margin": dataclasses.asdict(cfg.margin),
                 "dataset": data.content_hash}
    earlier = shards.read_json(marker) if storage.exists(marker) else {}
    if earlier and all(earlier.get(k) == v for k, v in made_from.items()):
        log.info("%s model trained before on the same data and recipe: %s", boot.name, earlier["checkpoint"])
        return earlier["checkpoint"]
    result = run_training(data, boot, cfg.margin, ray_address=cfg.services.ray_address)
    if result.error:
        raise RuntimeError(f"{boot.name} training failed: {result.error}")
    checkpoint = result.checkpoint.path
    if storage.is_s3(boot.storage) and not checkpoint.startswith("s3://"):
        checkpoint = "s3://" + checkpoint
    shards.write_json(marker, {"checkpoint": checkpoint, **made_from})
    return checkpoint

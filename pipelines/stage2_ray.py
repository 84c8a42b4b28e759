"""`arcface denoise` (alias `stage2`): refinement stage 2 on Ray.

Embed a stage-1 dataset with a model (Ray actors, pipelines/embed.py), then the
cleaning/denoise.py steps in order: intra-class outliers (label noise) -> merge identities
whose centres coincide -> drop identities that overlap the evaluation sets -> drop
identities left too small; relabel contiguously and write a new refined dataset (shards,
rejects of both stages, manifest, report). kept + rejected = read still holds.
The whole loop (stage 1 -> bootstrap model -> stage 2) is pipelines/clean_data.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

import numpy as np

from cleaning import rewrite
from cleaning.denoise import (EmbeddedSet, EvaluationOverlap, IntraClassOutliers, MergeIdentities, SmallIdentities,
                              contiguous_labels, round_decision)
from dataset import shards, storage
from dataset.refined import RefinedDataset, locations_overlap, real_location
from pipelines.denoise_config import DenoiseConfig

log = logging.getLogger(__name__)

STAGE = "stage2"


def evaluation_faces(data: RefinedDataset) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct face of the evaluation sets that come with the dataset (uint8 NHWC),
    and the person each shows as far as the sets tell (evaluation_people)."""
    from pipelines.evaluate import load_faces, load_pairs

    pair_uris, face_uris = data.eval_sets()
    return evaluation_people([load_pairs(u) for u in pair_uris], [load_faces(u) for u in face_uris])


def evaluation_people(pair_sets: list, face_sets: list) -> tuple[np.ndarray, np.ndarray]:
    """The distinct faces of these pair and identification sets (in the order first seen),
    and a person label for each: one image reached twice, the two faces of a same-person
    pair and the faces of one identity in an identification set show one person (connected
    components); a face nothing links is a person of its own. EvaluationOverlap weighs each
    person's faces together against the training identities."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = [p.faces for p in pair_sets] + [f.faces for f in face_sets]
    if not faces:
        return np.zeros((0, 112, 112, 3), np.uint8), np.zeros(0, np.int64)
    stacked = np.concatenate(faces)
    digests = np.array([hashlib.sha1(f.tobytes()).digest() for f in stacked], dtype=object)
    _, first, distinct = np.unique(digests, return_index=True, return_inverse=True)
    linked, at = [], 0  # pairs of rows of `stacked` that show one person
    for pairs in pair_sets:
        same = at + 2 * np.flatnonzero(pairs.issame)
        linked.append(np.stack([same, same + 1], 1))
        at += len(pairs.faces)
    for named in face_sets:
        order = np.argsort(named.identities, kind="stable")
        runs = named.identities[order][1:] == named.identities[order][:-1]  # neighbours of one identity
        linked.append(at + np.stack([order[:-1][runs], order[1:][runs]], 1))
        at += len(named.faces)
    edges = distinct.reshape(-1)[np.concatenate(linked).astype(np.int64)]  # in distinct faces
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(first), len(first)))
    _, person = connected_components(graph, directed=False)
    shown = np.argsort(first, kind="stable")  # distinct faces in the order first seen
    return stacked[first[shown]], person[shown].astype(np.int64)


def denoise_steps(cfg: DenoiseConfig, eval_embeddings: np.ndarray | None, model_centres: np.ndarray | None = None,
                  drop_overlap: bool = True, names: set[str] | None = None,
                  eval_people: np.ndarray | None = None) -> list:
    """Stage 2's steps, in their order, as the config builds them: intra-class outliers ->
    merge identities -> (evaluation overlap) -> small identities. The one place they are
    built (stage 2, benchmarks/replay_denoise.py, benchmarks/bench_stage2_scale.py)."""
    outliers = IntraClassOutliers(cfg.max_angle, cfg.min_images_to_judge, model_centres=model_centres,
                                  nearer_another=cfg.nearer_another_identity,
                                  same_person_angle=cfg.merge_same_person_angle)
    merges = MergeIdentities(cfg.merge_max_angle, same_person_angle=cfg.merge_same_person_angle)
    overlap = [EvaluationOverlap(eval_embeddings, cfg.overlap_max_angle, cfg.overlap_min_faces, names,
                                 same_person_angle=cfg.merge_same_person_angle, eval_people=eval_people)
               ] if drop_overlap else []
    return [outliers, merges, *overlap, SmallIdentities(cfg.min_images_per_identity)]


def _read_names(path: str) -> set[str]:
    if not path:
        return set()
    text = storage.read_bytes(path).decode()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def embedded_faces(data: RefinedDataset, model_uri: str, cfg: DenoiseConfig, ray_address: str) -> tuple:
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


def judge_round(embedded: EmbeddedSet, model_uri: str, cfg: DenoiseConfig) -> dict:
    """What `model_uri` (whose embeddings `embedded` holds) finds mislabelled, and whether that
    is evidence enough to stop refining (cleaning/denoise.round_decision): the intra-class
    step alone, on a copy; nothing is written."""
    from pipelines.training import checkpoint

    centres = checkpoint.read_all_centres(model_uri) if cfg.use_model_centres else None
    step = IntraClassOutliers(cfg.max_angle, cfg.min_images_to_judge, model_centres=centres)  # the threshold's view
    judged = step(EmbeddedSet(embedded.embeddings, embedded.groups.copy(), embedded.identities))
    return {"judged_faces": step.figures["judged_faces"],
            **round_decision(judged.angles, step.threshold, step.figures["max_angle_from"], cfg.another_round_above)}


def run_stage2(data: RefinedDataset, out: RefinedDataset, model_uri: str, cfg: DenoiseConfig,
                ray_address: str = "", mlflow_uri: str = "", drop_overlap: bool = True,
                loaded: tuple | None = None, loop: dict | None = None) -> RefinedDataset:
    """Stage 2 of `data` into `out` with the model `model_uri`. `drop_overlap` False keeps the
    evaluation-overlap identities (an intermediate round: the next round's bootstrap must
    learn them like any other identity, or it cannot recognise them in the evaluation set).
    `loaded`: what `embedded_faces` returned for this data and model, when the caller has it.
    `loop`: what `arcface clean-data` chose from the data before this stage (bootstrap
    lengths, rounds and the shares that decided them), recorded in the manifest."""
    from pipelines.models import load_embedder
    from pipelines.training import checkpoint

    check_denoise_output(data, out, model_uri)  # before anything is computed or written
    started = time.perf_counter()
    embedded, sizes = loaded or embedded_faces(data, model_uri, cfg, ray_address)
    eval_faces, eval_people = evaluation_faces(data)
    eval_emb = load_embedder(model_uri).embedder(eval_faces, True) if len(eval_faces) else None
    centres = checkpoint.read_all_centres(model_uri) if cfg.use_model_centres else None

    steps = denoise_steps(cfg, eval_emb, centres, drop_overlap, _read_names(cfg.exclude_identities), eval_people)
    outliers, merges = steps[0], steps[1]
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
    if loop is not None:
        summary["loop"] = loop
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
    from pipelines.stage1_dask import OutputRefused

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

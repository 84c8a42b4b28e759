"""`arcface clean-data` (alias `refine`; `make clean-data`): the paper's refinement loop.

stage 1 on Dask (pipelines/stage1_dask.py: raw -> aligned, filtered faces) -> train a
bootstrap model on it (Ray Train) -> stage 2 on Ray with that model (pipelines/stage2_ray.py:
label noise, merges, evaluation overlap) -> optionally retrain on the refined data. With
`denoise.rounds` > 1 a model trained on a round's output judges the stage-1 faces again.
Each step is skipped when its output exists and was made from the same inputs and config,
so a rerun continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from dataset import shards, storage
from dataset.refined import RefinedDataset
from pipelines.denoise_config import DenoiseConfig
from pipelines.stage1_dask import run_stage1
from pipelines.stage2_ray import STAGE, embedded_faces, judge_round, run_stage2

log = logging.getLogger(__name__)

# Where the loop's steps live under its --out.
REFINE_LAYOUT = {"stage1": "stage1", "stage2": "stage2", "runs": "runs", "bootstrap": "bootstrap.json"}


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


def run_clean_data(input_uri: str, fmt: str, out: str, cfg, scheduler: str | None = None,
               overwrite: bool = False) -> RefineResult:
    """stage 1 -> bootstrap model -> stage 2 (-> retrain), under `out`:
    stage1/ (a refined dataset), runs/ (checkpoints), bootstrap.json (which checkpoint the
    bootstrap model is, written once it is complete), stage2/ (the refined dataset); with
    `denoise.rounds` n > 1 also round1/ .. round{n-1}/ (each round's output, which trains the
    next round's model: bootstrap2.json ..), and stage2/ is judged by the last model.
    `cfg` is the whole Config: the loop runs every stage."""
    from pipelines.training.driver import run_training

    out = storage.absolute(out)
    storage.check_bucket(out)
    stage1 = RefinedDataset.create(storage.join(out, REFINE_LAYOUT["stage1"]))
    stage2 = RefinedDataset.create(storage.join(out, REFINE_LAYOUT["stage2"]))
    runs = storage.join(out, REFINE_LAYOUT["runs"])
    services = cfg.services
    # A rerun reuses each step's output only when it was made from the same inputs and
    # config: stage 1 per partition (fingerprints), the bootstrap model and stage 2 by record.
    stage1 = run_stage1(input_uri, fmt, stage1, cfg.clean, scheduler=scheduler, overwrite=overwrite)
    boot = dataclasses.replace(cfg.train, name="bootstrap", storage=runs, epochs=cfg.denoise.bootstrap_epochs,
                               max_steps=0, registered_model="", eval_every=0,
                               subcentres=cfg.denoise.bootstrap_subcentres)
    denoise_cfg = cfg.denoise
    stage1 = RefinedDataset.open(stage1.uri)
    model, length = _bootstrap(stage1, boot, cfg, storage.join(out, REFINE_LAYOUT["bootstrap"]))
    # What the loop chose from this run's data, and why: into the stage-2 manifest.
    started_from = storage.absolute(cfg.train.init_backbone) if cfg.train.init_backbone else ""  # "": random
    loop = {"bootstraps": [{"model": model, "started_from": started_from, **length}], "rounds": []}
    summary = RefineResult(stage1, stage2, model)
    loaded = None  # the current model's embeddings, read once for its check and its stage 2
    for later in range(2, cfg.denoise.rounds + 1):
        loaded = embedded_faces(stage1, model, denoise_cfg, services.ray_address)
        decision = judge_round(loaded[0], model, denoise_cfg)
        decision = {"round": later - 1, **decision}
        loop["rounds"].append(decision)
        share = decision["deciding_share"]  # what decided (not share_found, under a fallback rule)
        if not decision["another_round"]:
            log.info("round %d found %.1f%% of the faces mislabelled (%s < %.0f%%): no further round", later - 1,
                     100 * share, decision["decided_by"], 100 * cfg.denoise.another_round_above)
            _advise(loop, decision, started_from)
            break
        log.info("round %d found %.1f%% of the faces mislabelled (%s): a model trained on what it kept judges again",
                 later - 1, 100 * share, decision["decided_by"])
        # Round n-1's output, judged by round n-1's model, trains round n's model; each
        # round judges every stage-1 face again, so a face dropped wrongly can come back.
        # It cuts at the valley (Otsu's split) even where a fallback rule set a higher
        # threshold: what it keeps only trains the next model (round_decision).
        round_cfg = dataclasses.replace(denoise_cfg, max_angle=decision["intermediate_cut_deg"])
        earlier = RefinedDataset.create(storage.join(out, f"round{later - 1}"))
        if not _stage2_current(earlier, stage1, model, round_cfg, drop_overlap=False):
            # Overlap identities stay in: dropped here, the next bootstrap would never learn
            # them and would miss their evaluation faces (one of 3 missed at 20% noise).
            run_stage2(stage1, earlier, model, round_cfg, ray_address=services.ray_address, drop_overlap=False,
                        loaded=loaded)
        decision["share_set_aside"] = share_set_aside(RefinedDataset.open(earlier.uri))
        _advise(loop, decision, started_from)
        loaded = None  # the next model embeds anew
        boot = dataclasses.replace(boot, name=f"bootstrap{later}")
        # The new model's classes are round n-1's labels, not stage 1's: centres from embeddings.
        denoise_cfg = dataclasses.replace(denoise_cfg, use_model_centres=False)
        model, length = _bootstrap(RefinedDataset.open(earlier.uri), boot, cfg,
                                   storage.join(out, f"bootstrap{later}.json"))
        loop["bootstraps"].append({"model": model, "started_from": started_from, **length})
    summary.bootstrap_checkpoint = model
    if not _stage2_current(stage2, stage1, model, denoise_cfg):
        run_stage2(stage1, stage2, model, denoise_cfg, ray_address=services.ray_address,
                    mlflow_uri=services.mlflow_tracking_uri, loaded=loaded, loop=loop)
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


# The least share of faces a round finds mislabelled that makes the loop advise a face model:
# the seed sweep's lowest level, 30% label noise, is where random-weight bootstraps first
# missed the bar, and round 1 from random weights set aside 0.29-0.34 there on all 30 of its
# draws at both sizes, and at least 0.37 at 40-50% (benchmarks/results/refinement_seed_sweep_final*.json,
# refinement_seed_sweep_200x30.json). Apart from denoise.another_round_above, which a user may
# set low to force rounds.
ADVISE_FACE_MODEL_ABOVE = 0.25


def share_set_aside(round_output: RefinedDataset) -> float:
    """The share of the judged faces an intermediate round's intra-class step dropped: by angle
    and by the nearer-another rule together, what the next bootstrap does not train on."""
    intra = round_output.manifest.extra["stage2"]["steps"]["intra_class"]
    return round(sum(intra["dropped"].values()) / max(1, intra["judged_faces"]), 4)


def bootstrap_advice(decision: dict, started_from: str) -> str:
    """What to change when a bootstrap trained from random weights finds heavy label noise
    (`decision`: a round of the manifest's loop; its deciding share or, where the round ran,
    the share it set aside, at least ADVISE_FACE_MODEL_ABOVE): at 30-45% noise such
    bootstraps are what limited the seed sweep's worst draws, and bootstraps started from a
    face model met the bar where they missed it (benchmarks/results/refinement.md). The share
    set aside counts because the deciding share, measured on angles alone, stayed under 25%
    on 3 of 10 draws at 45% look-alike noise (seeds 2, 9 and 12; 12 missed the bar) where
    round 1 set aside 47% by angle and the nearer-another rule together. "" when there is
    nothing to say; with denoise.rounds 1 no round is judged, so nothing is said."""
    share = max(decision["deciding_share"], decision.get("share_set_aside", 0.0))
    if started_from or share < ADVISE_FACE_MODEL_ABOVE:
        return ""
    return (f"round {decision['round']} found {share:.0%} of the judged faces mislabelled, "
            "judged by a bootstrap trained from random weights: at such noise it can keep a look-alike's faces or "
            "leave one person filed twice apart. Start the bootstraps from a face model (train.init_backbone: an "
            "insightface backbone or your last model; for the demo, benchmarks/make_face_prior.py) with "
            "denoise.merge_same_person_angle=0 (README, refinement)")


def _advise(loop: dict, decision: dict, started_from: str) -> None:
    """Log the first round's advice, if any, and record it in the loop (manifest, report)."""
    advice = bootstrap_advice(decision, started_from)
    if advice and "advice" not in loop:
        log.warning("%s", advice)
        loop["advice"] = advice


def _bootstrap(data: RefinedDataset, boot, cfg, marker: str) -> tuple[str, dict]:
    """The checkpoint of a bootstrap model trained on `data` with recipe `boot` (its epochs
    raised by `bootstrap_length`): the one the marker names when it was made from the same
    data and recipe, else a new one; and the length chosen, with its evidence."""
    from pipelines.training.driver import run_training

    length = bootstrap_length(data.manifest.num_images, boot.batch_size, boot.epochs, cfg.denoise.bootstrap_min_steps)
    boot = dataclasses.replace(boot, epochs=length["epochs"])
    made_from = {"config": dataclasses.asdict(boot), "margin": dataclasses.asdict(cfg.margin),
                 "dataset": data.content_hash}
    earlier = shards.read_json(marker) if storage.exists(marker) else {}
    if earlier and all(earlier.get(k) == v for k, v in made_from.items()):
        log.info("%s model trained before on the same data and recipe: %s", boot.name, earlier["checkpoint"])
        return earlier["checkpoint"], length
    log.info("%s model: %d epochs of %d steps (%s)", boot.name, length["epochs"], length["steps_per_epoch"],
             length["rule"])
    result = run_training(data, boot, cfg.margin, ray_address=cfg.services.ray_address)
    if result.error:
        raise RuntimeError(f"{boot.name} training failed: {result.error}")
    checkpoint = result.checkpoint.path
    if storage.is_s3(boot.storage) and not checkpoint.startswith("s3://"):
        checkpoint = "s3://" + checkpoint
    shards.write_json(marker, {"checkpoint": checkpoint, **made_from, "length": length})
    return checkpoint, length


def bootstrap_length(faces: int, batch: int, epochs: int, min_steps: int) -> dict:
    """How long a bootstrap model trains on `faces`: `epochs`, raised until it takes at least
    `min_steps` optimizer steps (a step per full global batch, as the training loop counts);
    with the figures that chose it, for the marker and the manifest."""
    per_epoch = max(1, faces // batch)
    chosen = max(epochs, -(-min_steps // per_epoch))
    return {"faces": faces, "batch": batch, "steps_per_epoch": per_epoch, "configured_epochs": epochs,
            "min_steps": min_steps, "epochs": chosen, "steps": chosen * per_epoch,
            "rule": "configured epochs" if chosen == epochs else "epochs raised to reach the minimum steps"}

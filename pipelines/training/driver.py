"""`arcface train`'s driver: checks the input, then runs `train_loop` on Ray Train (V2).

A TorchTrainer with one worker per `train.workers` (gloo on CPU, nccl on GPU). Checkpoints
go to `train.storage` (absolute path or s3://) through Ray Train; a worker failure restarts
from the last one (`train.max_failures`), `--resume` starts from a given one.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from dataset import storage
from dataset.refined import RefinedDataset, split_eval_sets
from pipelines.training.checkpoint import latest_checkpoint, ray_storage
from pipelines.training.config import MarginConfig, TrainConfig
from pipelines.version import code_version

log = logging.getLogger(__name__)


class TrainingInputError(ValueError):
    """Input that no retry can fix (checked in the driver, before any worker starts)."""


class TrainingDiverged(ValueError):
    """The loss or a weight became non-finite during training (see loop.NonFiniteTraining)."""


def eval_sets_for(data: RefinedDataset, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """`train.eval_sets` (comma-separated) if given, else the sets that come with the dataset."""
    if cfg.eval_sets:
        return split_eval_sets([u.strip() for u in cfg.eval_sets.split(",") if u.strip()])
    return data.eval_sets()


def check_input(data: RefinedDataset, cfg: TrainConfig, margin: MarginConfig) -> str:
    """What would fail identically on every attempt fails here, once, in one line. Returns
    the SHA-256 of `train.init_backbone` ("" without one), for lineage."""
    digest = ""
    if cfg.init_backbone:
        from arcface_core.backbones import build_backbone
        from pipelines.training.step import load_backbone_file

        backbone = build_backbone(cfg.backbone, cfg.embedding_size)
        digest = load_backbone_file(backbone, cfg.init_backbone, cfg.backbone)
        for name, tensor in backbone.state_dict().items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise TrainingInputError(f"{cfg.init_backbone}: {name} holds NaN or infinite values: "
                                         "a backbone to start from must be finite")
    storage.check_bucket(cfg.storage)
    if cfg.batch_size % cfg.workers:
        raise TrainingInputError(f"train.batch_size {cfg.batch_size} does not split over {cfg.workers} workers")
    if data.manifest.num_images < cfg.batch_size:
        raise TrainingInputError(f"{data.uri}: {data.manifest.num_images} faces make no global batch of "
                                 f"{cfg.batch_size}; lower train.batch_size or use more data")
    from pipelines.training.data import ShardDataset

    try:  # a shard listed but gone or unreadable would fail every attempt of every worker
        shards = ShardDataset(data)
    except (OSError, ValueError) as exc:  # pyarrow: FileNotFoundError, ArrowInvalid (a ValueError)
        raise TrainingInputError(f"{data.uri}: a shard the manifest lists cannot be read "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    if shards.num_samples != data.manifest.num_images:
        raise TrainingInputError(f"{data.uri}: the shards hold {shards.num_samples} faces, the manifest says "
                                 f"{data.manifest.num_images}: the dataset was changed after it was written")
    problem = shards.label_problem()  # before any worker: they would train on it silently
    if problem:
        raise TrainingInputError(problem)
    from pipelines.training.config import RecipeMismatch, check_recipe_matches

    try:  # a recipe written for another dataset (train.num_classes) is refused here, once
        for note in check_recipe_matches(data.manifest, cfg):
            log.warning("%s", note)
    except RecipeMismatch as exc:
        raise TrainingInputError(str(exc)) from None
    return digest


def run_training(data: RefinedDataset | str, cfg: TrainConfig, margin: MarginConfig | None = None,
                 resume: str | None = None, mlflow_uri: str = "", ray_address: str = "", step_hook: str = ""):
    """Train on `data`; returns Ray Train's Result. `step_hook` (file.py:function) is called
    on every worker after every step (see loop.load_step_hook)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_connect import connect
    from pipelines.training.loop import stopped_marker, train_loop

    data = data if isinstance(data, RefinedDataset) else RefinedDataset.open(data)
    margin = margin or MarginConfig()
    init_digest = check_input(data, cfg, margin)
    cfg = dataclasses.replace(cfg, storage=storage.absolute(cfg.storage),
                              init_backbone=storage.absolute(cfg.init_backbone) if cfg.init_backbone else "")
    # arcface_torch's recipes give a per-GPU batch; ours is global, so say how it splits.
    per_worker, micro = cfg.batch_size // cfg.workers, max(1, cfg.gradient_accumulation)
    log.info("run %s: global batch %d = %d workers x %d%s", cfg.name, cfg.batch_size, cfg.workers, per_worker,
             f" ({micro} micro-batches of {per_worker // micro})" if micro > 1 else "")
    if resume == "latest":
        resume = latest_checkpoint(storage.join(cfg.storage, cfg.name))
        log.info("resuming from the newest complete checkpoint of %s: %s", cfg.name, resume)
    if not storage.is_s3(cfg.storage):
        os.makedirs(os.path.join(cfg.storage, cfg.name), exist_ok=True)
    if storage.exists(stopped_marker(cfg)):  # a new run (say, with a lower lr) starts afresh
        storage.delete(stopped_marker(cfg))
    connect(ray_address, num_cpus=max(2, cfg.workers))
    config = {
        "train": dataclasses.asdict(cfg), "margin": dataclasses.asdict(margin), "data": data.uri,
        "mlflow_uri": mlflow_uri,
        "eval_sets": eval_sets_for(data, cfg),
        "code_version": code_version(),
        "threads_per_worker": max(1, (os.cpu_count() or 2) // max(1, cfg.workers)) if not cfg.gpu else 4,
        "resume_from": resume or "",
        "step_hook": step_hook,
        "init_backbone_sha256": init_digest,
    }
    storage_path, storage_filesystem = ray_storage(cfg.storage)
    run_config = RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                           failure_config=FailureConfig(max_failures=cfg.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=3))
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        run_config=run_config,
    )
    try:
        result = trainer.fit()
    except Exception:
        diverged = storage.exists(stopped_marker(cfg))
        if not diverged:
            raise
    else:
        diverged = bool(result.error) and storage.exists(stopped_marker(cfg))
    if diverged:  # one line, not every attempt's worker traceback
        raise TrainingDiverged(storage.read_bytes(stopped_marker(cfg)).decode(errors="replace"))
    return result

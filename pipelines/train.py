"""`arcface train`: ArcFace on Ray Train (V2), data-parallel backbone + sharded class centres.

The driver builds a TorchTrainer (gloo on CPU, nccl on GPU); every worker runs
`train_loop`: it streams its slice of each global batch from the shards, runs the backbone
(DDP), gathers embeddings into the model-parallel margin softmax (arcface_core), steps,
checkpoints and, on rank 0, logs to MLflow and evaluates on a verification pair set.

Exactness: backbone gradients equal the single-process gradient of the mean loss over
the global batch (the embedding gradient is scaled by the world size to undo DDP's
averaging; batch norm uses global-batch statistics), so N workers follow the same
trajectory as one process on the same global batches.

Checkpoints (to `storage`, local or s3://) hold the backbone and its optimizer state
(rank 0), each rank's slice of the class centres and their momentum (file names carry the
class range), and the data position. Resuming re-slices the centres for the current
worker count, so a run continues on more or fewer workers.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import tempfile
import time

import torch

from arcface_core.backbones import build_backbone
from arcface_core.classifier import ShardedMarginClassifier
from arcface_core.margins import CombinedMargin, build_margin
from arcface_core.sync_bn import convert_global_batchnorm
from pipelines.config import TrainConfig
from pipelines.evaluate import scalar_metrics

log = logging.getLogger(__name__)
INIT_BLOCK = 4096  # centre initialisation is seeded per block of classes: same on any world size


def build_margin_from(cfg: TrainConfig):
    if cfg.margin == "combined":
        return CombinedMargin(cfg.scale, cfg.m1, cfg.m2, cfg.m3, cfg.straight_through)
    return build_margin(cfg.margin, s=cfg.scale, m=cfg.margin_m, straight_through=cfg.straight_through)


def init_centres(num_classes: int, dim: int, k: int, start: int, end: int, seed: int) -> torch.Tensor:
    """N(0, 0.01) centres for classes [start, end), identical whatever the sharding."""
    out = []
    for block in range(start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1):
        b0, b1 = block * INIT_BLOCK, min(num_classes, (block + 1) * INIT_BLOCK)
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        w = torch.normal(0.0, 0.01, ((b1 - b0) * k, dim), generator=g)
        lo, hi = max(start, b0) - b0, min(end, b1) - b0
        out.append(w[lo * k:hi * k])
    return torch.cat(out)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then polynomial decay to 0 at the last step (arcface_torch's schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (1 - (step - cfg.warmup_steps) / span) ** cfg.poly_power


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Trainee:
    """The model on one rank: backbone (+DDP), this rank's centres, both optimizers."""

    def __init__(self, cfg: TrainConfig, num_classes: int, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        torch.manual_seed(cfg.seed)  # the same backbone initialisation on every rank
        backbone = build_backbone(cfg.backbone, cfg.embedding_size)
        if world > 1 and cfg.sync_bn:
            if device.type == "cuda":
                backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
            else:
                backbone = convert_global_batchnorm(backbone)
        self.backbone = backbone.to(device)
        self.head = ShardedMarginClassifier(num_classes, cfg.embedding_size, build_margin_from(cfg),
                                            sample_rate=cfg.sample_rate, subcentres=cfg.subcentres,
                                            rank=rank, world_size=world, generator_seed=cfg.seed)
        with torch.no_grad():
            self.head.weight.copy_(init_centres(num_classes, cfg.embedding_size, cfg.subcentres,
                                                self.head.class_start, self.head.class_end, cfg.seed))
        self.head.to(device)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.backbone, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.model = self.backbone
        self.opt_backbone = make_optimizer(cfg, [p for p in self.backbone.parameters() if p.requires_grad])
        self.opt_head = make_optimizer(cfg, [self.head.weight])
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _amp_dtype(self):
        mode = self.cfg.amp
        if mode == "auto":
            mode = "bf16" if self.device.type == "cuda" else "off"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        for opt in (self.opt_backbone, self.opt_head):
            for group in opt.param_groups:
                group["lr"] = lr
        images = images.to(self.device, dtype=next(self.backbone.parameters()).dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            embeddings = self.model(images)
        if self.world > 1:
            # DDP averages backbone gradients over ranks; the loss is already the global mean.
            embeddings.register_hook(lambda g: g * self.world)
        loss = self.head(embeddings, labels)  # the head computes its logits in fp32 (or fp64)
        self.opt_backbone.zero_grad(set_to_none=True)
        self.opt_head.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt_backbone)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt_backbone)
        self.scaler.step(self.opt_head)
        self.scaler.update()
        return loss.detach()

    # -- checkpoints -------------------------------------------------------------------
    def save(self, directory: str, state: dict) -> None:
        start, end = self.head.class_start, self.head.class_end
        momentum = self.opt_head.state.get(self.head.weight, {})
        torch.save({"weight": self.head.weight.detach().cpu(),
                    "optimizer": {k: v.cpu() if torch.is_tensor(v) else v for k, v in momentum.items()}},
                   os.path.join(directory, f"centres-{start:010d}-{end:010d}.pt"))
        if self.rank == 0:
            torch.save({"backbone": self.backbone.state_dict(), "optimizer": self.opt_backbone.state_dict(),
                        "scaler": self.scaler.state_dict()}, os.path.join(directory, "backbone.pt"))
            with open(os.path.join(directory, "state.json"), "w") as fh:
                json.dump(state, fh, indent=1)

    def load(self, directory: str) -> dict:
        with open(os.path.join(directory, "state.json")) as fh:
            state = json.load(fh)
        blob = torch.load(os.path.join(directory, "backbone.pt"), map_location=self.device, weights_only=True)
        self.backbone.load_state_dict(blob["backbone"])
        self.opt_backbone.load_state_dict(blob["optimizer"])
        self.scaler.load_state_dict(blob["scaler"])
        # Centres: take the rows of our class range from whichever files hold them.
        k, start, end = self.cfg.subcentres, self.head.class_start, self.head.class_end
        weights, buffers = [], {}
        for path in sorted(glob.glob(os.path.join(directory, "centres-*.pt"))):
            lo, hi = (int(x) for x in os.path.basename(path)[8:-3].split("-"))
            if hi <= start or lo >= end:
                continue
            part = torch.load(path, map_location="cpu", weights_only=True)
            a, b = (max(lo, start) - lo) * k, (min(hi, end) - lo) * k
            weights.append(part["weight"][a:b])
            for name, value in part["optimizer"].items():
                if torch.is_tensor(value) and value.dim() == 2:
                    buffers.setdefault(name, []).append(value[a:b])
        weight = torch.cat(weights)
        if weight.shape != self.head.weight.shape:
            raise RuntimeError(f"checkpoint centres cover {weight.shape[0]} rows for classes [{start}, {end})")
        with torch.no_grad():
            self.head.weight.copy_(weight)
        if buffers:
            st = self.opt_head.state[self.head.weight]
            for name, parts in buffers.items():
                st[name] = torch.cat(parts).to(self.device)
            if "step" in part["optimizer"]:
                st["step"] = part["optimizer"]["step"]
        return state


def _record_placement(cfg: TrainConfig, rank: int) -> None:
    """Which node each rank runs on (run folder `placement.jsonl`, local storage only)."""
    import ray
    import socket

    if cfg.storage.startswith("s3://"):
        return
    os.makedirs(os.path.join(cfg.storage, cfg.name), exist_ok=True)
    with open(os.path.join(cfg.storage, cfg.name, "placement.jsonl"), "a") as fh:
        fh.write(json.dumps({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                             "host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 3)}) + "\n")


def _steps_log(cfg: TrainConfig) -> str | None:
    if cfg.storage.startswith("s3://"):
        return None
    return os.path.join(cfg.storage, cfg.name, "steps.jsonl")


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from pipelines.train_data import BatchStream, ShardDataset

    cfg = TrainConfig(**config["train"])
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = ShardDataset(config["data"])
    _record_placement(cfg, rank)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{data.num_samples} samples make no global batch of {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    trainee = Trainee(cfg, data.num_classes, rank, world, device)
    step, state = 0, {}
    # The run's own latest checkpoint (after a failure) wins over the one asked to start from.
    checkpoint = ray.train.get_checkpoint() or _requested_checkpoint(config.get("resume_from"))
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = trainee.load(d)
        step = state["step"]
        if rank == 0:
            log.info("resumed at step %d (checkpoint written by %d workers, now %d)", step, state["world"], world)
    stream = BatchStream(data, cfg.batch_size, rank, world, seed=cfg.seed, shuffle_rowgroups=cfg.shuffle_rowgroups,
                         threads=cfg.decode_threads)
    # A resumed run keeps logging into the MLflow run it started.
    tracker = _Tracker(config, cfg, data, state.get("mlflow_run_id"), resumed_at=step) if rank == 0 else None
    eval_sets = _load_eval_sets(config, cfg) if rank == 0 else None
    steps_log = _steps_log(cfg) if rank == 0 else None
    window = time.perf_counter()
    losses, pending = [], []  # losses of this logging window (MLflow); steps not yet in steps.jsonl
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, in_epoch + (total - step))
        for _, images, labels in stream.iterate(epoch, in_epoch, end):
            loss = trainee.step(images, labels, lr_at(step, cfg, total))
            step += 1
            if tracker:
                losses.append(loss)
            if steps_log:
                # On GPU the losses wait on the device and are written in one host sync per
                # logging window; on CPU (tests, the demo) every step is written at once.
                pending.append((step, loss, time.time()))
                if device.type == "cpu" or step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 \
                        or step == total:
                    _write_steps(steps_log, pending, world)
                    pending = []
            if cfg.fail_at_step and step == cfg.fail_at_step and rank == world - 1:
                marker = os.path.join(cfg.storage, cfg.name, "failed-once")
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    # Ray Train's controller learns of reported checkpoints by polling the
                    # workers (every 2 s by default); give it time to register the last one, so the test knows
                    # which checkpoint the run must resume from.
                    time.sleep(5)
                    os._exit(1)  # a worker dies mid-run (test hook)
            last = step == total
            if tracker and (step % cfg.log_every == 0 or last):
                seconds = time.perf_counter() - window
                tracker.log_step(step, torch.stack(losses).mean().item(), lr_at(step - 1, cfg, total),
                                 len(losses) * cfg.batch_size / max(seconds, 1e-9))
                window, losses = time.perf_counter(), []
            evaluate_now = (cfg.eval_every and step % cfg.eval_every == 0) or last
            report_now = step % cfg.checkpoint_every == 0 or last
            metrics = {"step": step, "loss": float(loss)} if evaluate_now or report_now else {}
            if evaluate_now and eval_sets is not None:
                results = _evaluate(trainee, eval_sets, device)
                metrics.update(scalar_metrics(results))
                tracker.log_eval(step, results)
            if report_now:
                state = {"step": step, "world": world, "num_classes": data.num_classes,
                         "dataset": data.content_hash, "config": dataclasses.asdict(cfg),
                         "mlflow_run_id": tracker.run_id if tracker else state.get("mlflow_run_id")}
                with tempfile.TemporaryDirectory() as tmp:
                    trainee.save(tmp, state)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if last:
                break
    stream.close()
    if tracker:
        tracker.finish(trainee.backbone, data)


def _write_steps(path: str, pending: list, world: int) -> None:
    values = torch.stack([loss for _, loss, _ in pending]).tolist()  # one host sync for the lot
    with open(path, "a") as fh:
        for (step, _, at), value in zip(pending, values):
            fh.write(json.dumps({"step": step, "loss": value, "world": world, "time": round(at, 3)}) + "\n")


def _ray_storage(uri: str):
    """(path, filesystem) as Ray Train takes them: S3 goes through our configured pyarrow
    filesystem (custom endpoints included), local paths are made absolute."""
    from cleaning import storage

    if storage.is_s3(uri):
        return uri[len("s3://"):], storage.s3_filesystem()
    return os.path.abspath(uri), None


def _requested_checkpoint(path: str | None):
    """`--resume PATH` (local or s3://) as a Ray Train checkpoint."""
    if not path:
        return None
    from ray.train import Checkpoint

    location, filesystem = _ray_storage(path)
    return Checkpoint(location, filesystem=filesystem)


def _load_eval_sets(config: dict, cfg: TrainConfig):
    """The pair sets and identification sets evaluated during training (rank 0)."""
    from pipelines.evaluate import load_faces, load_pairs

    pair_uris, face_uris = config.get("eval_sets") or ([], [])
    if not pair_uris and not face_uris:
        return None
    return [load_pairs(u) for u in pair_uris] + [load_faces(u) for u in face_uris]


def _evaluate(trainee: "Trainee", sets, device) -> dict[str, dict]:
    from pipelines.evaluate import PairSet, TorchEmbedder, identify, verify

    embedder = TorchEmbedder(trainee.backbone, device)
    return {s.name: verify(embedder, s) if isinstance(s, PairSet) else identify(embedder, s) for s in sets}


class _Tracker:
    """Rank 0's MLflow logging (when a tracking URI is configured): parameters, curves,
    evaluations, plots, and at the end the registered embedding model."""

    def __init__(self, config: dict, cfg: TrainConfig, data, run_id: str | None, resumed_at: int):
        self.uri = config.get("mlflow_uri") or ""
        self.config, self.cfg = config, cfg
        self.run = None
        self.run_id = None
        self.last_eval: dict[str, dict] = {}
        if not self.uri:
            return
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(cfg.mlflow_experiment)
        self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=cfg.name)
        self.run_id = self.run.info.run_id
        if not run_id:
            mlflow.log_params({f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()})
            mlflow.log_params({"data.uri": config["data"], "data.content_hash": data.content_hash,
                               "data.num_classes": data.num_classes, "data.num_images": data.num_samples,
                               "code.version": config.get("code_version", "")})
            mlflow.log_dict({"train": dataclasses.asdict(cfg), "data": config["data"],
                             "eval_sets": config.get("eval_sets")}, "config.json")
            mlflow.log_dict(data.manifest_summary(), "dataset/manifest_summary.json")
            _log_dataset_input(data)
        mlflow.set_tag("resumed_at_step", resumed_at)

    def log_step(self, step, loss, lr, samples_per_s):
        if self.run:
            import mlflow

            mlflow.log_metrics({"loss": loss, "lr": lr, "samples_per_s": samples_per_s}, step=step)

    def log_eval(self, step, results: dict[str, dict]):
        self.last_eval = results
        if self.run:
            import mlflow

            mlflow.log_metrics({f"eval.{k}": v for k, v in scalar_metrics(results).items()}, step=step)

    def finish(self, backbone, data):
        if not self.run:
            return
        import mlflow

        from pipelines.evaluate import roc_png

        from pipelines.registry import log_embedding_model

        _log_png(roc_png(self.last_eval, title=f"{self.cfg.name}: ROC"), "plots", "roc.png")
        history = mlflow.MlflowClient().get_metric_history(self.run_id, "loss")
        if history:
            _log_png(_loss_png(history), "plots", "loss.png")
        # The model is always logged with the run; registered when a name is configured.
        lineage = {"data.uri": self.config["data"], "data.content_hash": data.content_hash,
                   "code.version": self.config.get("code_version", ""), "train.run_name": self.cfg.name,
                   "train.backbone": self.cfg.backbone}
        version = log_embedding_model(backbone, self.cfg.embedding_size, self.cfg.registered_model,
                                      scalar_metrics(self.last_eval), lineage)
        if version is not None:
            log.info("registered %s version %s", version.name, version.version)
            mlflow.set_tag("registered_model_version", f"{version.name}/{version.version}")
        mlflow.end_run()


def _log_dataset_input(data) -> None:
    """The refined dataset as the run's MLflow input: its URI and content hash (lineage)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        dataset = MetaDataset(resolve_dataset_source(data.root), name=data.root.rstrip("/").rsplit("/", 1)[-1],
                              digest=data.content_hash[:36])
        mlflow.log_input(dataset, context="training")
    except Exception as exc:  # lineage that the run's params hold as well
        log.warning("could not log the dataset as an MLflow input: %s", exc)


def _log_png(png: bytes | None, folder: str, name: str) -> None:
    import mlflow

    if png:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as fh:
                fh.write(png)
            mlflow.log_artifact(path, folder)


def _loss_png(history) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    points = sorted((m.step, m.value) for m in history)
    ax.plot([p[0] for p in points], [p[1] for p in points])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over logging window)")
    ax.grid(alpha=0.3)
    from cleaning.report import _png

    png = _png(fig)
    plt.close(fig)
    return png


# -- driver ---------------------------------------------------------------------------

def code_version() -> str:
    """The git commit of the code; `submit-train` passes it in, since Ray's working-dir copy has no .git."""
    import subprocess

    if os.environ.get("ARCFACE_CODE_VERSION"):
        return os.environ["ARCFACE_CODE_VERSION"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except Exception:
        return ""


def eval_sets_for(data: str, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """`train.eval_sets` (comma-separated .bin pair sets and *_faces.parquet identification
    sets) if given, else the sets that came with the dataset."""
    from pipelines.evaluate import eval_sets_of

    if cfg.eval_sets:
        uris = [u.strip() for u in cfg.eval_sets.split(",") if u.strip()]
        return [u for u in uris if not u.endswith(".parquet")], [u for u in uris if u.endswith(".parquet")]
    return eval_sets_of(data)


def run_training(data: str, cfg: TrainConfig, resume: str | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not cfg.storage.startswith("s3://"):
        cfg.storage = os.path.abspath(cfg.storage)
        os.makedirs(os.path.join(cfg.storage, cfg.name), exist_ok=True)
    if not data.startswith("s3://"):
        data = os.path.abspath(data)
    from pipelines.ray_connect import connect

    connect(num_cpus=max(2, cfg.workers))
    eval_sets = eval_sets_for(data, cfg)
    config = {
        "train": dataclasses.asdict(cfg), "data": data,
        "mlflow_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
        "eval_sets": eval_sets,
        "code_version": code_version(),
        "threads_per_worker": max(1, (os.cpu_count() or 2) // max(1, cfg.workers)) if not cfg.gpu else 4,
        "resume_from": resume or "",
    }
    storage_path, storage_filesystem = _ray_storage(cfg.storage)
    run_config = RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                           failure_config=FailureConfig(max_failures=cfg.max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=3))
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        run_config=run_config,
    )
    return trainer.fit()

"""`train_loop`: what every Ray Train worker runs.

Flat, in the order a step happens: learning rate and margin schedule -> step -> log ->
evaluate / checkpoint -> stop. The data position is (epoch, step), so a run resumed from a
checkpoint, on any worker count, sees the same global batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import socket
import tempfile
import time

import torch

from dataset import storage
from pipelines.training.config import MarginConfig, TrainConfig, config_section
from pipelines.training.step import Trainee, lr_at

log = logging.getLogger(__name__)


def load_step_hook(spec: str):
    """`/path/to/file.py:function`, called as function(step=, rank=, world=, run_dir=) after
    every step: an extension point (fault-injection tests use it; profilers could). Loaded
    from a file path so that it works in Ray workers whatever their sys.path."""
    if not spec:
        return None
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(f"arcface_step_hook_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


class StepsLog:
    """`RUN/steps.jsonl` (local storage): one line per step with loss and wall time. On GPU the
    losses wait on the device and are written in one host sync per logging window; on CPU
    every step is written at once (tests and the demo read it live)."""

    def __init__(self, run_dir: str | None, world: int, every: int, eager: bool):
        self.path = os.path.join(run_dir, "steps.jsonl") if run_dir else None
        self.world, self.every, self.eager = world, every, eager
        self.pending: list[tuple[int, torch.Tensor, float, dict]] = []

    def record(self, step: int, loss: torch.Tensor, extra: dict, flush: bool) -> None:
        if not self.path:
            return
        self.pending.append((step, loss, time.time(), extra))
        if self.eager or flush or step % self.every == 0:
            values = torch.stack([p[1] for p in self.pending]).tolist()  # one host sync for the lot
            with open(self.path, "a") as fh:
                for (s, _, at, more), value in zip(self.pending, values):
                    fh.write(json.dumps({"step": s, "loss": value, "world": self.world, "time": round(at, 3),
                                         **more}) + "\n")
            self.pending = []


def _run_dir(cfg: TrainConfig) -> str | None:
    """The run's own folder for logs beside Ray's checkpoints (local storage only)."""
    if cfg.storage.startswith("s3://"):
        return None
    path = os.path.join(cfg.storage, cfg.name)
    os.makedirs(path, exist_ok=True)
    return path


def _record_placement(cfg: TrainConfig, run_dir: str | None, rank: int) -> None:
    """Which node each rank runs on: `RUN/placement.jsonl` on local storage; on S3 (no
    appends) one object per rank and process, `RUN/placement/rank-R-PID.json`."""
    import ray

    line = json.dumps({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                       "host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 3)})
    if run_dir:
        with open(os.path.join(run_dir, "placement.jsonl"), "a") as fh:
            fh.write(line + "\n")
    else:
        storage.write_bytes(storage.join(cfg.storage, cfg.name, "placement", f"rank-{rank}-{os.getpid()}.json"),
                            line.encode())


class NonFiniteTraining(RuntimeError):
    """The loss or a weight became NaN or infinite: the run stops, with no checkpoint of it."""


STOPPED_FILE = "stopped-nonfinite.txt"  # in the run's folder: why the run stopped, for its retries


def stopped_marker(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage, cfg.name, STOPPED_FILE)


def _stop_nonfinite(cfg: TrainConfig, rank: int, step: int, what: str) -> None:
    """Record why and raise. Ray Train retries any worker failure (train.max_failures): a
    retry finds the record and stops at once instead of training the same divergence again;
    the driver reads it and reports it in one line (a new `arcface train` starts afresh)."""
    message = (f"run {cfg.name}: {what} at step {step} (rank {rank}): training stopped with no checkpoint "
               "of it; lower train.lr or check the data and the initial weights")
    storage.write_bytes(stopped_marker(cfg), message.encode())
    raise NonFiniteTraining(message)


def _nonfinite_weights(trainee: Trainee) -> str:
    """The first parameter that is not finite ("" when all are)."""
    for name, param in list(trainee.backbone.named_parameters()) + [("margin head weight", trainee.head.weight)]:
        if not bool(torch.isfinite(param.detach()).all()):
            return name
    return ""


def _batches(stream, start: int, total: int, steps_per_epoch: int):
    """FaceBatches for global steps [start, total), across epoch boundaries."""
    step = start
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, in_epoch + (total - step))
        for _, batch in stream.iterate(epoch, in_epoch, end):
            yield batch
        step += end - in_epoch


def _margin_figures(trainee: Trainee) -> dict:
    """Schedules worth watching (SphereFace's lambda)."""
    lam = getattr(trainee.margin, "lam", None)
    return {"margin_lambda": float(lam)} if lam is not None else {}


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from pipelines.evaluate import evaluate_backbone, load_sets
    from pipelines.training.data import BatchStream, ShardDataset
    from pipelines.training.checkpoint import checkpoint_at
    from pipelines.training.tracking import Tracker

    from pipelines.logs import Progress

    quiet_worker_logs()
    cfg = TrainConfig(**config["train"])
    if storage.exists(stopped_marker(cfg)):  # a retry of a run that diverged: no second try
        raise NonFiniteTraining(storage.read_bytes(stopped_marker(cfg)).decode(errors="replace"))
    margin = config_section(MarginConfig, config["margin"])
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    data = ShardDataset(config["data"])
    run_dir = _run_dir(cfg)
    _record_placement(cfg, run_dir, rank)
    steps_per_epoch = data.steps_per_epoch(cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    trainee = Trainee(cfg, data.num_classes, rank, world, device, margin)
    step, state = 0, {}
    # The run's own latest checkpoint (after a failure) wins over the one asked to start from.
    start_from = ray.train.get_checkpoint() or checkpoint_at(config.get("resume_from"))
    if start_from:
        with start_from.as_directory() as d:
            state = trainee.load(d)
        step = state["step"]
        if rank == 0:
            log.info("resumed at step %d (checkpoint written by %d workers, now %d)", step, state["world"], world)

    stream = BatchStream(data, cfg.batch_size, rank, world, seed=cfg.seed, shuffle_rowgroups=cfg.shuffle_rowgroups,
                         threads=cfg.decode_threads, pin_memory=device.type == "cuda",
                         prepare_on_host=device.type != "cuda")
    # A resumed run keeps logging into the MLflow run it started.
    tracker = Tracker(config, cfg, data, state.get("mlflow_run_id"), resumed_at=step) if rank == 0 else None
    eval_sets = load_sets(*config["eval_sets"]) if rank == 0 and config.get("eval_sets") else None
    steps_log = StepsLog(run_dir if rank == 0 else None, world, cfg.log_every, eager=device.type == "cpu")
    hook = load_step_hook(config.get("step_hook", ""))
    window_start, window_losses, window_timed = time.perf_counter(), [], 0
    compile_reported = False
    # Rank 0 shows the way: step out of the total, loss, lr, throughput, time left.
    bar = Progress(f"train {cfg.name}", total, unit="step") if rank == 0 else None
    if bar:
        bar.update(step)

    for batch in _batches(stream, step, total, steps_per_epoch):
        lr = lr_at(step, cfg, total, steps_per_epoch)
        trainee.margin.set_step(step)
        loss = trainee.step(batch.images, batch.labels, lr, flips=batch.flips)
        step += 1
        compiled_now = rank == 0 and trainee.compile_seconds is not None and not compile_reported
        last = step == total
        checkpoint_now = step % cfg.checkpoint_every == 0 or last
        evaluate_now = bool(cfg.eval_every and step % cfg.eval_every == 0) or last
        # One host sync per logging window on GPU (every step on CPU, where it costs nothing);
        # always before a checkpoint, so that no checkpoint holds a diverged model.
        if (device.type == "cpu" or checkpoint_now or step % cfg.log_every == 0) and not bool(torch.isfinite(loss)):
            _stop_nonfinite(cfg, rank, step, f"the loss is {float(loss)}")
        if checkpoint_now and (bad := _nonfinite_weights(trainee)):
            _stop_nonfinite(cfg, rank, step, f"{bad} holds NaN or infinite values")

        figures = _margin_figures(trainee)
        steps_log.record(step, loss, figures, flush=checkpoint_now)
        if rank == 0:
            window_losses.append(loss)
            if compiled_now:  # the compiling step is reported apart and kept out of img/s
                compile_reported = True
                bar.figures["compile s"] = round(trainee.compile_seconds, 1)
                if tracker:
                    tracker.log_compile(trainee.compile_seconds)
                window_start, window_timed = time.perf_counter(), 0
            else:
                window_timed += 1
            if step % cfg.log_every == 0 or last:  # one host sync per logging window
                seconds = time.perf_counter() - window_start
                window = {"loss": torch.stack(window_losses).mean().item(), "lr": lr,
                          "img/s": window_timed * cfg.batch_size / max(seconds, 1e-9)}
                if tracker:
                    tracker.log_step(step, window["loss"], lr, window["img/s"], figures)
                bar.figures.update(window)
                window_start, window_losses, window_timed = time.perf_counter(), [], 0
            bar.update(1)
        if hook:
            hook(step=step, rank=rank, world=world, run_dir=run_dir)

        metrics = {"step": step, "loss": float(loss)} if evaluate_now or checkpoint_now else {}
        if evaluate_now and eval_sets:
            results = evaluate_backbone(trainee.backbone, eval_sets, device)
            metrics.update(tracker.log_eval(step, results))
        if checkpoint_now:
            state = {"step": step, "world": world, "num_classes": data.num_classes, "dataset": data.content_hash,
                     "config": dataclasses.asdict(cfg), "margin": dataclasses.asdict(margin),
                     "mlflow_run_id": tracker.run_id if tracker else state.get("mlflow_run_id")}
            with tempfile.TemporaryDirectory() as tmp:
                trainee.save(tmp, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    stream.close()
    if bar:
        bar.close()
    if tracker:
        tracker.finish(trainee.backbone, data)


def quiet_worker_logs() -> None:
    """Ray Train reports every checkpoint at INFO from every worker, and MLflow prints run
    links and artifact progress bars: kept out of the user's stream unless debugging."""
    if os.environ.get("ARCFACE_LOG_LEVEL", "").upper() == "DEBUG":
        return
    for name in ("ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


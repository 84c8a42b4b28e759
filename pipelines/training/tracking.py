"""Rank 0's MLflow tracking of a training run: parameters (config, margin, dataset
content hash, code version), curves, evaluations, plots, and at the end the embedding model
(logged with the run, registered when `train.registered_model` is set)."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

from dataset import storage
from pipelines.evaluate import scalar_metrics
from pipelines.training.config import TrainConfig

log = logging.getLogger(__name__)


def _flat(prefix: str, section: dict) -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


class Tracker:
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
            mlflow.log_params(_flat("margin", config["margin"]))
            mlflow.log_params({"data.uri": config["data"], "data.content_hash": data.content_hash,
                               "data.num_classes": data.num_classes, "data.num_images": data.num_samples,
                               "code.version": config.get("code_version", ""),
                               "init_backbone.sha256": config.get("init_backbone_sha256", "")})
            mlflow.log_dict({"train": dataclasses.asdict(cfg), "margin": config["margin"], "data": config["data"],
                             "eval_sets": config.get("eval_sets")}, "config.json")
            mlflow.log_dict(data.manifest_summary(), "dataset/manifest_summary.json")
            _log_dataset_input(data)
        mlflow.set_tag("resumed_at_step", resumed_at)

    def log_step(self, step, loss, lr, samples_per_s, extra: dict | None = None):
        if self.run:
            import mlflow

            mlflow.log_metrics({"loss": loss, "lr": lr, "samples_per_s": samples_per_s, **(extra or {})}, step=step)

    def log_compile(self, seconds: float) -> None:
        """torch.compile's time (the first step's wall time), apart from the throughput."""
        if self.run:
            import mlflow

            mlflow.log_metric("compile_seconds", seconds)

    def log_eval(self, step, results: dict[str, dict]) -> dict[str, float]:
        """Logs the evaluation; returns its scalar figures (`<set>.<metric>`)."""
        self.last_eval = results
        figures = scalar_metrics(results)
        if self.run:
            import mlflow

            mlflow.log_metrics({f"eval.{k}": v for k, v in figures.items()}, step=step)
        return figures

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
                   "train.init_backbone": self.cfg.init_backbone,
                   "init_backbone.sha256": self.config.get("init_backbone_sha256", ""),
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
        dataset = MetaDataset(resolve_dataset_source(data.root), name=storage.name(data.root),
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
    from cleaning.report import figure_png

    png = figure_png(fig)
    plt.close(fig)
    return png

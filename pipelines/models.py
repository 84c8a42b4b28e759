"""Models given by URI, loaded as embedders: a training checkpoint folder (local or s3://),
an MLflow model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/ID/embedder`, a logged
model folder) or an in-process backbone (`TorchEmbedder`). Also the trust boundary for a
model named on the command line, and alias pinning (workers that load a model one after
another must all see the same version).

An *embedder* is any callable (uint8 faces (N, 112, 112, 3), flip) -> L2-normalised float32
embeddings. Evaluation (pipelines/evaluate.py, eval_workers.py, ijb.py), stage 2 and the
registry (pipelines/registry.py) load models through here; this module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arcface_core.embedder import AlignedFaceEmbedder, embed_faces


class TorchEmbedder:
    """An in-process backbone as an embedder."""

    def __init__(self, backbone: torch.nn.Module, device="cpu", batch: int = 128):
        self.model = AlignedFaceEmbedder(backbone)
        self.device, self.batch = torch.device(device), batch

    @torch.no_grad()
    def __call__(self, faces: np.ndarray, flip: bool = True) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            out = [embed_faces(self.model, torch.from_numpy(faces[i:i + self.batch]).to(self.device), flip).cpu()
                   for i in range(0, len(faces), self.batch)]
        finally:
            self.model.train(was_training)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def raw(self, faces: np.ndarray) -> np.ndarray:
        """Embedding of each face plus its mirror's, not normalised (IJB's norm weighting)."""
        self.model.eval()
        out = []
        for i in range(0, len(faces), self.batch):
            x = torch.from_numpy(faces[i:i + self.batch]).to(self.device)
            out.append((self.model(x) + self.model(torch.flip(x, dims=[2]))).float().cpu())
        return torch.cat(out).numpy()



@dataclass
class LoadedModel:
    uri: str
    embedder: object  # (faces uint8 NHWC, flip) -> normalised embeddings
    kind: str  # "mlflow" | "checkpoint"


class _PyfuncEmbedder:
    """An MLflow model as an embedder: its `predict` on the CPU; with `program` (the model's
    torch.export program moved to another device, `_program_on`) the same computation there."""

    def __init__(self, model, program=None, device: str = "cpu", batch: int = 256):
        self.model, self.program, self.device, self.batch = model, program, torch.device(device), batch

    def __call__(self, faces: np.ndarray, flip: bool = True) -> np.ndarray:
        if self.program is None:
            return np.asarray(self.model.predict(faces, params={"flip": bool(flip)}), np.float32)
        # what serving_model.predict computes, batch by batch on self.device
        out = [torch.nn.functional.normalize(self._forward(faces[i:i + self.batch], flip), dim=1)
               for i in range(0, len(faces), self.batch)]
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    @torch.no_grad()
    def _forward(self, faces: np.ndarray, flip: bool) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(faces)).to(self.device)
        e = self.program(x)
        if flip:
            e = e + self.program(torch.flip(x, dims=[2]))
        return e.float().cpu()

    @torch.no_grad()
    def raw(self, faces: np.ndarray) -> np.ndarray:
        """Embedding of each face plus its mirror's, not normalised (the model's own program)."""
        if self.program is not None:
            return torch.cat([self._forward(faces[i:i + self.batch], True)
                              for i in range(0, len(faces), self.batch)]).numpy()
        program = self.model.unwrap_python_model().program
        x = torch.from_numpy(np.ascontiguousarray(faces))
        return (program(x) + program(torch.flip(x, dims=[2]))).numpy()


def _program_on(model_dir: str, device: str):
    """The torch.export program of a logged embedder (artifact `program.pt2`), moved to
    `device` by torch's own pass (which also rewrites the devices written into the graph)."""
    from torch.export.passes import move_to_device_pass

    found = sorted(Path(model_dir).rglob("program.pt2"))
    if not found:
        raise ValueError(f"{model_dir}: no program.pt2 in this MLflow model, so it cannot run on {device}")
    return move_to_device_pass(torch.export.load(str(found[0])), device).module()


class UntrustedModel(ValueError):
    """A model whose loading would run code from a place nobody vouched for."""


def require_trusted(uri: str, trust_code: bool) -> None:
    """The trust boundary for a model given on the command line. Training checkpoints are
    tensors only (loaded with weights_only=True) and `models:/`/`runs:/` URIs resolve in
    the tracking server you configured; a model *folder* (an MLmodel file beside Python
    code, as MLflow models from code are) runs that code when loaded, so it needs
    --trust-model-code."""
    from dataset import storage
    from pipelines.training import checkpoint

    if trust_code or uri.startswith(("models:/", "runs:/")) or checkpoint.is_checkpoint(uri):
        return
    if storage.exists(storage.join(uri, "MLmodel")):
        raise UntrustedModel(f"{uri} is an MLflow model folder: loading it runs the Python code stored in it. "
                             "Pass --trust-model-code if you trust its origin, or register it and use models:/NAME/VERSION")


def _is_mlflow_model(uri: str) -> bool:
    from dataset import storage

    return uri.startswith(("models:/", "runs:/", "m-")) or storage.exists(storage.join(uri, "MLmodel"))


def check_model_uri(uri: str) -> None:
    """The one-line error `load_embedder` would give, without loading anything (so evaluation
    workers are not started for a model that cannot load)."""
    from pipelines.training import checkpoint

    if not (checkpoint.is_checkpoint(uri) or _is_mlflow_model(uri)):
        raise ValueError(f"{uri}: neither an MLflow model URI nor a training checkpoint folder")


def pin_model_uri(uri: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION` of the version the alias names now
    (workers that load it one after another must not see the alias move); any other URI as is."""
    if uri.startswith("models:/") and "@" in uri:
        version = resolve_version(uri)
        return f"models:/{version.name}/{version.version}"
    return uri


def load_embedder(uri: str, device: str = "cpu") -> LoadedModel:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/embedder`, a logged-model
    folder (with an MLmodel file), or a training checkpoint folder (state.json + backbone.pt;
    local or s3://), on `device` (an MLflow model's own `predict` runs on the CPU; on another
    device its torch.export program is moved there and run the same way)."""
    from pipelines.training import checkpoint

    if checkpoint.is_checkpoint(uri):
        return LoadedModel(uri, _checkpoint_embedder(uri, device), "checkpoint")
    if _is_mlflow_model(uri):
        import mlflow

        if torch.device(device).type == "cpu":
            return LoadedModel(uri, _PyfuncEmbedder(mlflow.pyfunc.load_model(uri)), "mlflow")
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        return LoadedModel(uri, _PyfuncEmbedder(mlflow.pyfunc.load_model(local), _program_on(local, device), device),
                           "mlflow")
    raise ValueError(f"{uri}: neither an MLflow model URI nor a training checkpoint folder")


def _checkpoint_embedder(uri: str, device: str = "cpu"):
    from arcface_core.backbones import build_backbone
    from pipelines.training import checkpoint

    cfg = checkpoint.read_state(uri)["config"]
    backbone = build_backbone(cfg["backbone"], cfg["embedding_size"])
    backbone.load_state_dict(checkpoint.read_backbone(uri)["backbone"])
    return TorchEmbedder(backbone.eval().to(device), device)


def resolve_version(model_uri: str, client=None):
    """The ModelVersion behind `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    import mlflow

    client = client or mlflow.MlflowClient()
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, number = ref.partition("/")
    return client.get_model_version(name, number)

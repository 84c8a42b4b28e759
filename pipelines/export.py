"""`arcface export`: models and data in the formats the field uses.

* `--model URI --format onnx --out FILE`: the embedder as ONNX (opset 18, dynamic batch).
  The graph takes aligned 112x112 RGB uint8 faces (N, 112, 112, 3), as our MLflow model does,
  and returns L2-normalised float32 embeddings of each face plus its mirror image (the flip
  test inside the graph, `--no-flip` leaves it out). Checked in onnxruntime against PyTorch
  on the same faces; the largest absolute difference is reported and must stay under 1e-4.
  For a registered version (`models:/NAME/VERSION` or `@ALIAS`) the file is also logged as an
  artifact of the version's run (`onnx/`) and the check recorded as version tags.
* `--data DATASET --format rec --out DIR`: a refined dataset as insightface RecordIO
  (`train.rec`, `train.idx`, `property`; header record, identity records), the input
  arcface_torch trains on unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from dataset import shards, storage
from dataset.refined import RefinedDataset
from pipelines.logs import Progress

log = logging.getLogger(__name__)
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4


class ServingEmbedder(torch.nn.Module):
    """uint8 NHWC faces -> L2-normalised embeddings, with the flip test inside."""

    def __init__(self, embedder: torch.nn.Module, flip: bool = True):
        super().__init__()
        self.embedder, self.flip = embedder, flip

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        e = self.embedder(faces)
        if self.flip:
            e = e + self.embedder(torch.flip(faces, dims=[2]))
        return torch.nn.functional.normalize(e, dim=1)


def _torch_embedder(model_uri: str) -> torch.nn.Module:
    """The uint8-in embedder of a checkpoint folder or an MLflow model, as a torch module."""
    from pipelines.training import checkpoint

    if checkpoint.is_checkpoint(model_uri):
        from arcface_core.backbones import build_backbone
        from arcface_core.embedder import AlignedFaceEmbedder

        cfg = checkpoint.read_state(model_uri)["config"]
        backbone = build_backbone(cfg["backbone"], cfg["embedding_size"])
        backbone.load_state_dict(checkpoint.read_backbone(model_uri)["backbone"])
        return AlignedFaceEmbedder(backbone.eval()).eval()
    import mlflow

    # Our models' code (pipelines/serving_model.py) holds a torch.export program.
    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return python_model.program


@dataclass
class OnnxExport:
    path: str
    opset: int
    flip: bool
    max_abs_diff: float
    faces_checked: int


def export_onnx(model_uri: str, out: str, flip: bool = True, check_faces: np.ndarray | None = None) -> OnnxExport:
    import onnxruntime

    # (No .eval() here: the embedder is already in eval mode, and an exported program's
    # module refuses train()/eval() calls.)
    model = ServingEmbedder(_torch_embedder(model_uri), flip)
    example = torch.zeros((2, 112, 112, 3), dtype=torch.uint8)
    program = torch.onnx.export(model, (example,), dynamic_shapes={"faces": {0: torch.export.Dim("batch")}},
                                opset_version=ONNX_OPSET, dynamo=True, verbose=False)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    program.save(out)
    if check_faces is None:  # varied content and batch sizes 1 and 7 (the batch axis is dynamic)
        check_faces = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    diff = 0.0
    for part in (check_faces[:1], check_faces[1:]):
        with torch.no_grad():
            expected = model(torch.from_numpy(np.ascontiguousarray(part))).numpy()
        got = session.run(None, {name: part})[0]
        diff = max(diff, float(np.abs(expected - got).max()))
    if diff > ONNX_TOLERANCE:
        raise RuntimeError(f"{out}: onnxruntime differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE:g})")
    return OnnxExport(out, ONNX_OPSET, flip, diff, len(check_faces))


def log_onnx_to_registry(model_uri: str, result: OnnxExport) -> str | None:
    """For `models:/NAME/VERSION|@ALIAS`: the file as an artifact of the version's run, and tags."""
    if not model_uri.startswith("models:/"):
        return None
    import mlflow

    from pipelines.registry import resolve_version

    client = mlflow.MlflowClient()
    version = resolve_version(model_uri, client)
    client.log_artifact(version.run_id, result.path, "onnx")
    for key, value in {"onnx.opset": result.opset, "onnx.flip_inside": result.flip,
                       "onnx.max_abs_diff": f"{result.max_abs_diff:.3g}"}.items():
        client.set_model_version_tag(version.name, version.version, key, str(value))
    return f"{version.name} v{version.version}"


def export_rec(data: RefinedDataset, out: str) -> int:
    """The dataset as insightface RecordIO, classes in label order. Memory: the label column
    plus the shard being read (each shard's rows are read when its first label comes up)."""
    from cleaning.formats.recordio import write_rec

    if storage.is_s3(out):
        raise ValueError("RecordIO export writes a local folder (arcface_torch reads local files)")
    uris = data.shard_uris()
    labels = [shards.read_table(u, ["label"]).column("label").to_numpy() for u in uris]
    where = np.concatenate([np.stack([np.full(len(lab), s), np.arange(len(lab))], 1) for s, lab in enumerate(labels)]) \
        if labels else np.zeros((0, 2), np.int64)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    order = np.argsort(all_labels, kind="stable")
    bar = Progress("export rec", total=len(order), unit="face")

    def items():
        cached: tuple[int, list] = (-1, [])
        for i in order:
            shard, row = where[i]
            if shard != cached[0]:
                cached = (shard, shards.read_table(uris[shard], ["image"]).column("image").to_pylist())
            bar.update(1)
            yield int(all_labels[i]), cached[1][row]

    os.makedirs(out, exist_ok=True)
    count = write_rec(out, items())
    bar.close()
    return count

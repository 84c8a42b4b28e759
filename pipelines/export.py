"""`arcface export`: models and data in the formats the field uses.

* `--model URI --format onnx --out FILE`: the embedder as ONNX (opset 18, dynamic batch),
  in one of two layouts:
  - `--layout serving` (default): the graph takes aligned 112x112 RGB uint8 faces
    (N, 112, 112, 3), as our MLflow model does, and returns L2-normalised float32
    embeddings of each face plus its mirror image (the flip test inside the graph,
    `--no-flip` leaves it out);
  - `--layout insightface`: what arcface_torch's torch2onnx.py writes and insightface's
    tools (onnx_helper.ArcFaceORT, onnx_ijbc.py, the insightface package's ArcFaceONNX)
    read: the backbone alone, one float32 NCHW input `data` (N, 3, 112, 112) that the
    caller has normalised as (x - 127.5) / 127.5, one output, the raw (not normalised)
    embedding; no flip (those tools flip themselves).
  Checked in onnxruntime against PyTorch on the same faces: the largest absolute difference
  between the L2-normalised embeddings is reported and must stay under 1e-4. The insightface
  layout is also checked for what those tools read from the file (see `insightface_problems`).
  For a registered version (`models:/NAME/VERSION` or `@ALIAS`) the file is also logged as an
  artifact of the version's run (`onnx/`) and the check recorded as version tags.
* `--model URI --format pth --out FILE`: the backbone's state dict (tensors only), under
  arcface_torch's parameter names: `get_model(name).load_state_dict(torch.load(FILE))`
  takes it for every backbone with an arcface_torch counterpart, and `--init-backbone`
  takes it back.
* `--data DATASET --format rec --out DIR`: a refined dataset as insightface RecordIO
  (`train.rec`, `train.idx`, `property`; header record, identity records), the input
  arcface_torch trains on unchanged.

No export replaces an existing file unless asked to (`overwrite=True`, `--overwrite`).
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
LAYOUTS = ("serving", "insightface")
# insightface's tools read a model whose first nodes are named Sub.../_minus... and
# Mul.../_mul.../Div... as one that normalises its own input (MXNet's exports) and feed it
# raw pixels; onnx_helper.ArcFaceORT.check looks at the first 8 nodes.
_MXNET_SUB, _MXNET_MUL = ("Sub", "_minus"), ("Mul", "_mul", "Div")


def refuse_overwrite(path: str, overwrite: bool, source: str = "") -> None:
    """An export writes only a file of its own: never through a link, never into what it
    reads (`source`: the model or dataset, links resolved; --overwrite does not lift that),
    and an existing file only with `overwrite`."""
    from dataset.refined import locations_overlap

    if storage.is_s3(path):
        return
    if os.path.islink(path):
        raise FileExistsError(f"{path} is a link (to {os.readlink(path)}); an export writes a file of its own")
    if source and not source.startswith(("models:/", "runs:/")) and locations_overlap(path, source):
        raise FileExistsError(f"{path} lies inside {source}, which this export reads; write it elsewhere")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    if overwrite and os.path.exists(path):
        log.warning("--overwrite: replacing %s", path)


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


def load_backbone(model_uri: str) -> tuple[torch.nn.Module, str]:
    """The float32 backbone (eval mode, CPU) of a training checkpoint or a registered
    version, and its name in our registry. A registered version's network is a
    torch.export program of the uint8-in embedder: its weights are the backbone's under a
    `backbone.` prefix, and the version's `train.backbone` tag names the network."""
    from arcface_core.backbones import build_backbone
    from pipelines.training import checkpoint

    if checkpoint.is_checkpoint(model_uri):
        cfg = checkpoint.read_state(model_uri)["config"]
        backbone = build_backbone(cfg["backbone"], cfg["embedding_size"])
        backbone.load_state_dict(checkpoint.read_backbone(model_uri)["backbone"])
        return backbone.float().eval(), cfg["backbone"]
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri}: the backbone's network is known for a training checkpoint or a registered "
                         "version (models:/NAME/VERSION or @ALIAS); export from one of those")
    import mlflow

    from pipelines.models import resolve_version

    name = resolve_version(model_uri).tags.get("train.backbone")
    if not name:
        raise ValueError(f"{model_uri}: the version has no train.backbone tag naming its network; "
                         "export from its training checkpoint instead")
    program = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().program
    with torch.no_grad():
        dim = program(torch.zeros((1, 112, 112, 3), dtype=torch.uint8)).shape[1]
    state = {k[len("backbone."):]: v for k, v in program.state_dict().items() if k.startswith("backbone.")}
    backbone = build_backbone(name, dim)
    backbone.load_state_dict(state)
    return backbone.float().eval(), name


@dataclass
class OnnxExport:
    path: str
    opset: int
    flip: bool
    max_abs_diff: float
    faces_checked: int
    layout: str = "serving"


def insightface_problems(path: str) -> list[str]:
    """What would stop insightface's tools from reading the file as this layout: the parts
    of onnx_helper.ArcFaceORT.check that look at the file (one 4-d input with a symbolic
    batch and 112x112 faces, one output, at least 8 nodes, no weights below 32 bits, and no
    Sub + Mul/Div node names among the first 8, which would make the tools skip the input
    normalisation). Empty when it fits."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    graph, problems = model.graph, []
    if len(graph.input) != 1 or len(graph.output) != 1:
        problems.append(f"{len(graph.input)} inputs and {len(graph.output)} outputs (one of each expected)")
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    if len(dims) != 4 or not isinstance(dims[0], str) or dims[1:] != [3, 112, 112]:
        problems.append(f"input shape {dims} (expected [batch, 3, 112, 112])")
    if len(graph.node) < 8:
        problems.append(f"{len(graph.node)} nodes (the checker takes fewer than 8 as no model)")
    narrow = [i.name for i in graph.initializer if numpy_helper.to_array(i).dtype.itemsize < 4]
    if narrow:
        problems.append(f"weights below 32 bits: {', '.join(narrow[:5])}")
    first = [n.name for n in graph.node[:8]]
    if any(n.startswith(_MXNET_SUB) for n in first) and any(n.startswith(_MXNET_MUL) for n in first):
        problems.append(f"first nodes {first} read as an MXNet model that normalises its own input")
    return problems


def export_onnx(model_uri: str, out: str, flip: bool = True, check_faces: np.ndarray | None = None,
                layout: str = "serving", overwrite: bool = False) -> OnnxExport:
    """`flip` applies to the serving layout (the insightface layout never flips)."""
    import onnxruntime

    if layout not in LAYOUTS:
        raise ValueError(f"unknown ONNX layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    refuse_overwrite(out, overwrite, source=model_uri)
    if check_faces is None:  # varied content and batch sizes 1 and 7 (the batch axis is dynamic)
        check_faces = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    batch = torch.export.Dim("batch")
    if layout == "serving":
        # (No .eval() here: the embedder is already in eval mode, and an exported program's
        # module refuses train()/eval() calls.)
        model = ServingEmbedder(_torch_embedder(model_uri), flip)
        example = torch.zeros((2, 112, 112, 3), dtype=torch.uint8)
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET,
                                    dynamo=True, verbose=False)
        inputs = [np.ascontiguousarray(check_faces[:1]), np.ascontiguousarray(check_faces[1:])]
    else:
        flip = False
        model, _ = load_backbone(model_uri)
        example = torch.zeros((2, 3, 112, 112), dtype=torch.float32)
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["data"],
                                    output_names=["embedding"], opset_version=ONNX_OPSET, dynamo=True, verbose=False)
        # The caller's rule: NCHW float, (x - 127.5) / 127.5.
        normalised = ((check_faces.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
        inputs = [np.ascontiguousarray(normalised[:1]), np.ascontiguousarray(normalised[1:])]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    program.save(out)
    try:
        problems = insightface_problems(out) if layout == "insightface" else []
        if problems:
            raise RuntimeError(f"{out}: insightface's tools would not read it: {'; '.join(problems)}")
        session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        diff = 0.0
        for part in inputs:
            with torch.no_grad():
                expected = torch.nn.functional.normalize(model(torch.from_numpy(part)), dim=1).numpy()
            got = torch.nn.functional.normalize(torch.from_numpy(session.run(None, {name: part})[0]), dim=1).numpy()
            diff = max(diff, float(np.abs(expected - got).max()))
        if diff > ONNX_TOLERANCE:
            raise RuntimeError(f"{out}: onnxruntime differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE:g})")
    except Exception:
        os.remove(out)  # no file that failed its check is left behind
        raise
    return OnnxExport(out, ONNX_OPSET, flip, diff, len(check_faces), layout)


@dataclass
class PthExport:
    path: str
    backbone: str  # our registry's name
    insightface: str | None  # arcface_torch's get_model name, None for our own designs
    tensors: int
    sha256: str


def export_pth(model_uri: str, out: str, overwrite: bool = False) -> PthExport:
    """The backbone's state dict as a plain {name: tensor} file (torch.save), CPU float32,
    names as arcface_torch's modules have them; loads with torch.load(weights_only=True)."""
    import hashlib
    import io

    from arcface_core.backbones import backbone_spec

    refuse_overwrite(out, overwrite, source=model_uri)
    backbone, name = load_backbone(model_uri)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(f"{out}.part", "wb") as f:
        f.write(data)
    os.replace(f"{out}.part", out)
    return PthExport(out, name, backbone_spec(name).insightface, len(state), hashlib.sha256(data).hexdigest())


def log_onnx_to_registry(model_uri: str, result: OnnxExport) -> str | None:
    """For `models:/NAME/VERSION|@ALIAS`: the file as an artifact of the version's run, and tags."""
    if not model_uri.startswith("models:/"):
        return None
    import mlflow

    from pipelines.models import resolve_version

    client = mlflow.MlflowClient()
    version = resolve_version(model_uri, client)
    client.log_artifact(version.run_id, result.path, "onnx")
    # The serving layout's tags keep their names; the other layout's are apart from them.
    prefix = "onnx" if result.layout == "serving" else f"onnx_{result.layout}"
    for key, value in {"opset": result.opset, "flip_inside": result.flip,
                       "max_abs_diff": f"{result.max_abs_diff:.3g}"}.items():
        client.set_model_version_tag(version.name, version.version, f"{prefix}.{key}", str(value))
    return f"{version.name} v{version.version}"


def export_rec(data: RefinedDataset, out: str, overwrite: bool = False) -> int:
    """The dataset as insightface RecordIO, classes in label order. Memory: the label column
    plus the shard being read (each shard's rows are read when its first label comes up)."""
    from cleaning.formats.recordio import write_rec

    if storage.is_s3(out):
        raise ValueError("RecordIO export writes a local folder (arcface_torch reads local files)")
    for name in ("train.rec", "train.idx", "property"):
        refuse_overwrite(os.path.join(out, name), overwrite, source=data.uri)
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

"""The formats of the field: ONNX export (checked in onnxruntime), fine-tuning from an
insightface-format backbone file, and a refined dataset as insightface RecordIO."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from arcface_core.backbones import build_backbone
from dataset import RefinedDataset
from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig
from pipelines.training.step import Trainee, load_backbone_file, read_backbone_file

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(folder: Path, backbone: str = "tiny", dim: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_backbone(backbone, dim)
    for m in model.modules():  # non-trivial batch-norm statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    folder.mkdir(parents=True)
    checkpoint.write_backbone(str(folder), model.state_dict(), {}, {})
    checkpoint.write_state(str(folder), {"step": 1, "config": {"backbone": backbone, "embedding_size": dim}})
    return folder


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from pipelines.export import ServingEmbedder, _torch_embedder, export_onnx

    ckpt = _checkpoint(tmp_path / "ckpt")
    result = export_onnx(str(ckpt), str(tmp_path / "model.onnx"))
    assert result.max_abs_diff <= 1e-4 and result.opset == 18 and result.flip
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [112, 112, 3]
    faces = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    got = session.run(None, {inp.name: faces})[0]
    assert got.shape == (3, 64) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        expected = ServingEmbedder(_torch_embedder(str(ckpt))).eval()(torch.from_numpy(faces)).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    # The flip test is in the graph: a face and its mirror give the same embedding.
    mirrored = session.run(None, {inp.name: np.ascontiguousarray(faces[:, :, ::-1])})[0]
    assert np.abs(mirrored - got).max() <= 1e-4


def _bgr_face(seed: int) -> np.ndarray:
    """A 112x112 BGR uint8 image, as insightface's tools read one with cv2.imread."""
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def test_insightface_onnx_layout_passes_the_mfr_checker(tmp_path):
    """`--layout insightface` as arcface_torch's tools read it: insightface's own checker
    (onnx_helper.ArcFaceORT.check, the MFR challenge's) accepts the file, picks the
    (x - 127.5) / 127.5 normalisation, and the embedding it computes is our backbone's."""
    pytest.importorskip("onnxruntime")
    from pipelines.export import export_onnx, load_backbone
    from reference.arcface_torch.onnx_helper import ArcFaceORT

    ckpt = _checkpoint(tmp_path / "ckpt", backbone="tiny-s2", dim=64)
    folder = tmp_path / "submission"
    result = export_onnx(str(ckpt), str(folder / "model.onnx"), layout="insightface")
    assert result.layout == "insightface" and not result.flip and result.max_abs_diff <= 1e-4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "data" and inp.type == "tensor(float)" and isinstance(inp.shape[0], str)
    assert inp.shape[1:] == [3, 112, 112]

    checker = ArcFaceORT(str(folder), cpu=True)
    face = _bgr_face(8)
    assert checker.check("cfat", test_img=face) is None
    assert (checker.input_mean, checker.input_std, checker.feat_dim) == (127.5, 127.5, 64)
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]  # no batch-axis rewrite was needed

    # The checker's own preprocessing (cv2.dnn.blobFromImage, BGR -> RGB) and session give
    # the raw embedding of our backbone on the normalised RGB face.
    got = checker.forward(face)
    backbone, _ = load_backbone(str(ckpt))
    rgb = torch.from_numpy(face[:, :, ::-1].copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        expected = backbone((rgb - 127.5) / 127.5).numpy()
    assert got.shape == (1, 64) and np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    # onnx_ijbc.py's use: a face and its mirror in one batch, the pair's features side by side.
    pair = np.stack([face[:, :, ::-1], face[:, ::-1, ::-1]]).astype(np.float32).transpose(0, 3, 1, 2)
    feats = session.run(None, {"data": (pair - checker.input_mean) / checker.input_std})[0].reshape(-1, 128)
    assert np.abs(feats[:, :64] - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert not np.allclose(feats[:, 64:], feats[:, :64], atol=1e-3)  # no flip inside this layout


def test_mxnet_like_first_nodes_are_refused(tmp_path):
    """A graph that starts by normalising its own input (Sub, Mul named first, as MXNet's
    exports) would be fed raw pixels by insightface's tools: the layout check names it."""
    pytest.importorskip("onnx")
    import onnx
    from onnx import TensorProto, helper

    from pipelines.export import insightface_problems

    nodes = [helper.make_node("Sub", ["data", "m"], ["a"], name="Sub_0"),
             helper.make_node("Mul", ["a", "s"], ["b"], name="Mul_1")]
    nodes += [helper.make_node("Relu", [f"r{i}" if i else "b"], [f"r{i + 1}"], name=f"Relu_{i}") for i in range(7)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("r7", TensorProto.FLOAT, None)],
        [helper.make_tensor("m", TensorProto.FLOAT, [], [127.5]), helper.make_tensor("s", TensorProto.FLOAT16, [], [1.0])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    problems = insightface_problems(str(tmp_path / "m.onnx"))
    assert any("normalises its own input" in p for p in problems) and any("below 32 bits: s" in p for p in problems)


def test_exports_refuse_to_overwrite(tmp_path):
    from pipelines.export import export_onnx, export_pth

    ckpt = _checkpoint(tmp_path / "ckpt")
    taken = tmp_path / "taken.bin"
    taken.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="taken.bin exists; pass --overwrite"):
        export_pth(str(ckpt), str(taken))
    if pytest.importorskip("onnxruntime"):
        with pytest.raises(FileExistsError, match="--overwrite"):
            export_onnx(str(ckpt), str(taken), layout="insightface")
    assert taken.read_bytes() == b"keep me"
    export_pth(str(ckpt), str(taken), overwrite=True)
    assert torch.load(taken, weights_only=True).keys() == build_backbone("tiny", 64).state_dict().keys()


def test_pth_export_loads_into_arcface_torch(tmp_path):
    """`--format pth` as arcface_torch loads it: get_model(name).load_state_dict(torch.load(f))
    on the reference module code, which then computes our embedding; `--init-backbone`
    takes the same file back."""
    from pipelines.export import export_pth, load_backbone
    from reference.arcface_torch import get_model

    ckpt = _checkpoint(tmp_path / "ckpt", backbone="mobilefacenet", dim=128)
    result = export_pth(str(ckpt), str(tmp_path / "backbone.pth"))
    assert (result.backbone, result.insightface) == ("mobilefacenet", "mbf")
    assert result.sha256 == hashlib.sha256((tmp_path / "backbone.pth").read_bytes()).hexdigest()
    state = torch.load(tmp_path / "backbone.pth", weights_only=True)
    theirs = get_model(result.insightface, num_features=128)
    theirs.load_state_dict(state, strict=True)
    ours, _ = load_backbone(str(ckpt))
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected, got = ours(x), theirs.eval()(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    model = build_backbone("mbf", 128)  # arcface_torch's name, as its users write it
    assert load_backbone_file(model, str(tmp_path / "backbone.pth"), "mbf") == result.sha256
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_onnx_export_of_a_registered_version(tmp_path, mlflow_server):
    pytest.importorskip("onnxruntime")
    import mlflow

    from pipelines.cli import main
    from pipelines.registry import log_embedding_model

    mlflow.set_tracking_uri(mlflow_server)
    torch.manual_seed(3)
    with mlflow.start_run():
        version = log_embedding_model(build_backbone("tiny", 32).eval(), 32, "onnx-demo", {}, {})
    out = tmp_path / "exported.onnx"
    code = main(["export", "--model", f"models:/onnx-demo/{version.version}", "--format", "onnx", "--out", str(out),
                 "--set", f"services.mlflow_tracking_uri={mlflow_server}"])
    assert code == 0 and out.exists()
    client = mlflow.MlflowClient(mlflow_server)
    tags = client.get_model_version("onnx-demo", version.version).tags
    assert float(tags["onnx.max_abs_diff"]) <= 1e-4 and tags["onnx.opset"] == "18"
    assert [a.path for a in client.list_artifacts(version.run_id, "onnx")] == ["onnx/exported.onnx"]


def test_backbone_of_a_registered_version(tmp_path, mlflow_server):
    """A registered version's weights come back from its program under the backbone's own
    names (the version's train.backbone tag names the network); without the tag, a clear error."""
    import mlflow

    from pipelines.export import export_pth, load_backbone
    from pipelines.registry import log_embedding_model

    mlflow.set_tracking_uri(mlflow_server)
    torch.manual_seed(4)
    original = build_backbone("tiny", 32).eval()
    with mlflow.start_run():
        tagged = log_embedding_model(original, 32, "pth-demo", {}, {"train.backbone": "tiny"})
        untagged = log_embedding_model(original, 32, "pth-demo", {}, {})
    backbone, name = load_backbone(f"models:/pth-demo/{tagged.version}")
    assert name == "tiny"
    state = original.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())
    result = export_pth(f"models:/pth-demo/{tagged.version}", str(tmp_path / "b.pth"))
    assert result.insightface is None and result.tensors == len(state)
    if importlib.util.find_spec("onnxruntime"):  # the insightface layout's tags stand apart from the serving layout's
        from pipelines.export import export_onnx, log_onnx_to_registry

        uri = f"models:/pth-demo/{tagged.version}"
        log_onnx_to_registry(uri, export_onnx(uri, str(tmp_path / "insightface.onnx"), layout="insightface"))
        tags = mlflow.MlflowClient(mlflow_server).get_model_version("pth-demo", tagged.version).tags
        assert tags["onnx_insightface.flip_inside"] == "False" and float(tags["onnx_insightface.max_abs_diff"]) <= 1e-4
        assert "onnx.opset" not in tags
    with pytest.raises(ValueError, match="no train.backbone tag"):
        load_backbone(f"models:/pth-demo/{untagged.version}")


def test_insightface_format_backbone_loads_and_mismatch_is_named(tmp_path):
    torch.manual_seed(5)
    released = build_backbone("tiny", 64).state_dict()
    plain, wrapped = tmp_path / "backbone.pth", tmp_path / "ddp.pth"
    torch.save(released, plain)  # insightface releases plain state dicts (torch.save(model.state_dict()))
    torch.save({f"module.{k}": v for k, v in released.items()}, wrapped)  # as saved from DDP
    for path in (plain, wrapped):
        model = build_backbone("tiny", 64)
        digest = load_backbone_file(model, str(path), "tiny")
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        for k, v in model.state_dict().items():
            assert torch.equal(v, released[k]), k
    with pytest.raises(ValueError, match=r"does not fit backbone 'tiny'.*features.weight: file \(64,\), model \(128,\)"):
        load_backbone_file(build_backbone("tiny", 128), str(plain), "tiny")
    state, _ = read_backbone_file(str(plain))
    assert set(state) == set(released)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="weights_only|Unsupported|global"):
        read_backbone_file(str(tmp_path / "evil.pth"))


def test_trainee_starts_from_the_file_with_frozen_stages(tmp_path):
    torch.manual_seed(6)
    released = build_backbone("tiny", 32).state_dict()
    torch.save(released, tmp_path / "b.pth")
    cfg = TrainConfig(backbone="tiny", embedding_size=32, init_backbone=str(tmp_path / "b.pth"), freeze_stages=2,
                      batch_size=8)
    trainee = Trainee(cfg, 10, 0, 1, torch.device("cpu"))
    for k, v in trainee.backbone.state_dict().items():
        assert torch.equal(v, released[k]), k
    frozen = {n for n, p in trainee.backbone.named_parameters() if not p.requires_grad}
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight"} <= frozen
    assert not any(n.startswith(("layer3", "layer4", "fc")) for n in frozen)  # (features.weight: fixed at 1 by design)
    before = {n: p.detach().clone() for n, p in trainee.backbone.named_parameters()}
    trainee.step(torch.randn(8, 3, 112, 112), torch.arange(8) % 10, lr=0.1)
    after = dict(trainee.backbone.named_parameters())
    assert torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])


@pytest.mark.services
def test_fine_tuning_run_records_the_file(tmp_path, demo_shards, mlflow_server):
    import mlflow
    import ray

    from pipelines.config import load_config
    from pipelines.training.driver import run_training

    full = load_config(ROOT / "configs" / "demo-train.toml")
    torch.manual_seed(7)
    torch.save(build_backbone(full.train.backbone, full.train.embedding_size).state_dict(), tmp_path / "released.pth")
    cfg = full.train
    cfg.storage, cfg.name, cfg.max_steps, cfg.epochs, cfg.workers = str(tmp_path / "runs"), "ft", 4, 50, 1
    cfg.checkpoint_every, cfg.eval_every, cfg.registered_model = 4, 0, ""
    cfg.init_backbone = str(tmp_path / "released.pth")
    try:
        result = run_training(str(demo_shards), cfg, full.margin, mlflow_uri=mlflow_server)
    finally:
        ray.shutdown()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
    run = mlflow.MlflowClient(mlflow_server).get_run(state["mlflow_run_id"])
    assert run.data.params["init_backbone.sha256"] == hashlib.sha256((tmp_path / "released.pth").read_bytes()).hexdigest()
    assert run.data.params["train.init_backbone"] == str(tmp_path / "released.pth")


def test_recordio_export_reads_back_record_for_record(tmp_path, demo_shards):
    from cleaning.readers import plan, read_partition
    from pipelines.export import export_rec

    data = RefinedDataset.open(demo_shards)
    out = tmp_path / "faces_emore"
    assert export_rec(data, str(out)) == data.manifest.num_images
    with pytest.raises(FileExistsError, match="train.rec exists; pass --overwrite"):
        export_rec(data, str(out))
    assert export_rec(data, str(out), overwrite=True) == data.manifest.num_images
    assert (out / "property").read_text().strip() == f"{data.num_classes},112,112"
    table = pq.read_table(demo_shards / "shards", columns=["label", "image"]).to_pydict()
    expected = sorted(zip(table["label"], table["image"]), key=lambda r: r[0])  # stable: shard order within a class
    got = [(int(s.identity), s.data) for p in plan("insightface-rec", str(out), 10**9) for s in read_partition(p)]
    assert got == expected
    # Partitions of the exported file cut at identity boundaries (its identity records).
    parts = plan("insightface-rec", str(out), 50)
    labels = [{s.identity for s in read_partition(p)} for p in parts]
    assert len(parts) > 1 and all(not (a & b) for i, a in enumerate(labels) for b in labels[:i])

"""Evaluation embedded on Ray workers (pipelines/eval_workers.py): the demo's `.bin` pair set,
its identification set and its IJB-C-style release give the same figures with 1 and 2 Ray
workers (an in-process Ray with 2 CPUs) as in this process, which gives those of the
whole-set reference; workers read the images themselves, also from S3; bad input is one
clear error; `.bin` results are recorded on a registered version."""

import os

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arcface_core.backbones import build_backbone
from cleaning.align import align_face
from pipelines import ijb
from pipelines.eval_workers import InProcess
from pipelines.evaluate import ParquetImages, decode_aligned, evaluate, evaluate_model, identify, load_faces, \
    load_pairs, scalar_metrics, verify
from pipelines.models import load_embedder
from pipelines.training import checkpoint

CHUNK = 16  # small jobs: several per set, so two workers interleave and order matters


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's evaluation sets (eval/demo_pairs.bin, eval/demo_faces.parquet) and its
    IJB-C-style release, and an untrained tiny checkpoint (its figures are far from 0 and 1)."""
    from cleaning.synthetic.demo import DemoConfig, generate

    root = tmp_path_factory.mktemp("eval_demo")
    generate(root, DemoConfig(identities=4, images_per_identity=2, eval_identities=8, eval_pairs=40,
                              ijb_subjects=6, seed=3, workers=1), ["vggface2"])
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    checkpoint.write_backbone(str(ckpt), build_backbone("tiny", 32).state_dict(), {}, {})
    checkpoint.write_state(str(ckpt), {"step": 1, "config": {"backbone": "tiny", "embedding_size": 32}})
    return {"pairs": str(root / "eval/demo_pairs.bin"), "faces": str(root / "eval/demo_faces.parquet"),
            "ijb": str(root / "ijb/IJBC"), "model": str(ckpt), "root": root}


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """An in-process Ray with 2 CPUs; its workers see the local S3 endpoint (they inherit this
    environment when Ray starts)."""
    import ray

    before = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    if ray.is_initialized():  # an earlier module's Ray: its workers never saw this endpoint
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield ray
    ray.shutdown()
    if before is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = before


def _same_figures(a: dict, b: dict, tol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        fa, fb = scalar_metrics({name: a[name]}), scalar_metrics({name: b[name]})
        assert fa.keys() == fb.keys()
        for key in fa:
            assert abs(fa[key] - fb[key]) <= tol, (key, fa[key], fb[key])
        for x, y in zip(*(r[name].get("roc", ()) for r in (a, b))):
            np.testing.assert_allclose(x, y, atol=tol)


def test_chunked_in_process_path_equals_the_whole_set_reference(demo):
    embedder = load_embedder(demo["model"]).embedder
    pairs, faces = load_pairs(demo["pairs"]), load_faces(demo["faces"])
    reference = {pairs.name: verify(embedder, pairs), faces.name: identify(embedder, faces)}
    _same_figures(evaluate(embedder, [demo["pairs"]], [demo["faces"]], chunk=CHUNK), reference)
    # IJB: every image read, aligned and embedded in one go, against jobs of 16
    s = ijb.load_ijb(demo["ijb"], "IJBC")
    whole = []
    for name, marks in zip(s.images, s.landmarks):
        img = cv2.cvtColor(cv2.imread(os.path.join(demo["ijb"], "loose_crop", name)), cv2.COLOR_BGR2RGB)
        whole.append(align_face(img, marks))
    expected = embedder.raw(np.stack(whole))
    assert len(s.images) > 2 * CHUNK
    np.testing.assert_allclose(ijb.embed_images(s, embedder, chunk=CHUNK), expected, atol=1e-6)


def test_parquet_jobs_read_across_row_groups(tmp_path):
    faces = np.random.default_rng(0).integers(0, 255, (23, 112, 112, 3), dtype=np.uint8)
    blobs = [cv2.imencode(".png", f)[1].tobytes() for f in faces]
    path = str(tmp_path / "x_faces.parquet")
    pq.write_table(pa.table({"image": blobs, "identity": ["a"] * 23}), path, row_group_size=5)
    for start, stop in [(0, 23), (3, 12), (5, 10), (9, 11), (22, 23)]:
        load = ParquetImages(path, start, stop).open({})
        got = np.stack([load(i) for i in range(stop - start)])
        np.testing.assert_array_equal(got, decode_aligned(blobs[start:stop]))


def test_ray_workers_give_the_in_process_figures(demo, ray_local):
    kwargs = dict(pair_uris=[demo["pairs"]], face_uris=[demo["faces"]], ijb_root=demo["ijb"], chunk=CHUNK)
    here = evaluate_model(demo["model"], workers=0, **kwargs)
    assert len(here.results) == 3 and here.ijb_name.startswith("IJBC-")
    assert 0.0 < here.results[here.ijb_name]["tar_at_far_0.1"] < 1.0  # an untrained model: a real figure
    for workers in (1, 2):
        on_ray = evaluate_model(demo["model"], workers=workers, **kwargs)
        _same_figures(on_ray.results, here.results)
    _workers_gone(ray_local)


def _workers_gone(ray, timeout=20.0):
    """The actors were killed: their CPUs are free again."""
    import time

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_ray_workers_read_from_s3(demo, ray_local, s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="eval-sets")
    root = demo["root"]
    for path in [*root.glob("eval/*"), *root.glob("ijb/IJBC/**/*")]:
        if path.is_file():
            s3.upload_file(str(path), "eval-sets", str(path.relative_to(root)))
    local = evaluate_model(demo["model"], [demo["pairs"]], [demo["faces"]], ijb_root=demo["ijb"], chunk=CHUNK)
    remote = evaluate_model(demo["model"], ["s3://eval-sets/eval/demo_pairs.bin"],
                            ["s3://eval-sets/eval/demo_faces.parquet"], ijb_root="s3://eval-sets/ijb/IJBC",
                            workers=2, chunk=CHUNK)
    _same_figures(remote.results, local.results)  # the set names hash the bytes: the same on S3


def test_bad_input_is_one_clear_error(demo, ray_local, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="neither an MLflow model URI nor a training checkpoint"):
        evaluate_model(str(tmp_path), [demo["pairs"]], workers=2)  # refused before any worker starts
    # a model that fails to load on the workers: the loading error itself, not a dead actor
    unloadable = tmp_path / "unloadable"
    shutil.copytree(demo["model"], unloadable)
    checkpoint.write_state(str(unloadable), {"step": 1, "config": {"backbone": "nonexistent", "embedding_size": 32}})
    with pytest.raises(ValueError, match="unknown backbone 'nonexistent'"):
        evaluate_model(str(unloadable), [demo["pairs"]], workers=2)
    broken = tmp_path / "IJBC"
    shutil.copytree(demo["ijb"], broken)
    first = sorted((broken / "loose_crop").iterdir())[0]
    first.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"{first.name}: not a decodable image"):
        evaluate_model(demo["model"], ijb_root=str(broken), workers=1, chunk=CHUNK)


def test_a_plain_embedder_and_a_runner_agree(demo):
    embedder = load_embedder(demo["model"]).embedder
    runner = InProcess(embedder)
    try:
        _same_figures(evaluate(runner, [demo["pairs"]], chunk=CHUNK), evaluate(embedder, [demo["pairs"]]))
    finally:
        runner.close()


@pytest.mark.services
def test_bin_results_are_recorded_on_the_version(demo, ray_local, mlflow_server, monkeypatch, capsys):
    import mlflow

    from pipelines.cli import main

    from pipelines.registry import log_embedding_model, promote, record_evaluation

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with mlflow.start_run():
            versions.append(log_embedding_model(build_backbone("tiny", 32).eval(), 32, "bin-record", {}, {}).version)
    client.set_registered_model_alias("bin-record", "candidate", versions[0])
    # by alias, on 2 Ray workers (they load the version the alias names, from this tracking server)
    done = evaluate_model("models:/bin-record@candidate", [demo["pairs"]], [demo["faces"]], workers=2, chunk=CHUNK)
    assert done.model_uri == f"models:/bin-record/{versions[0]}"  # the alias pinned
    assert record_evaluation(done.model_uri, done.results) == f"bin-record v{versions[0]}"
    figures = scalar_metrics(done.results)
    pair_set = next(n for n in done.results if n.startswith("demo_pairs-"))
    tags = client.get_model_version("bin-record", versions[0]).tags
    run = client.get_run(client.get_model_version("bin-record", versions[0]).run_id)
    for key in (f"{pair_set}.accuracy", f"{pair_set}.tar_at_far_0.1"):
        assert float(tags[f"eval.{key}"]) == pytest.approx(figures[key], rel=1e-5)
        assert run.data.metrics[f"eval.{key}"] == pytest.approx(figures[key])
    # the same figures in this process: the MLflow model on a Ray worker is the same model
    _same_figures(evaluate_model(f"models:/bin-record/{versions[0]}", [demo["pairs"]], [demo["faces"]],
                                 chunk=CHUNK).results, done.results)
    # promote --pairs evaluates both versions on Ray workers and gates on the recorded figures
    assert promote("bin-record", versions[0], pair_uris=[demo["pairs"]], workers=2).promoted
    decision = promote("bin-record", versions[1], pair_uris=[demo["pairs"]], workers=2)
    second = client.get_model_version("bin-record", versions[1]).tags
    assert decision.promoted == (float(second[f"eval.{pair_set}.accuracy"]) > float(tags[f"eval.{pair_set}.accuracy"]))
    # `arcface evaluate --pairs` on a models:/ URI records the .bin set's figures on the version
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert main(["evaluate", "--model", f"models:/bin-record/{versions[1]}", "--pairs", demo["pairs"],
                 "--workers", "1"]) == 0
    assert f"recorded on bin-record v{versions[1]}" in capsys.readouterr().out
    assert f"eval.{pair_set}.accuracy" in client.get_model_version("bin-record", versions[1]).tags


@pytest.mark.services
def test_an_mlflow_model_moved_to_a_device_embeds_as_its_predict(mlflow_server):
    """The path a GPU worker takes for a models:/ URI (its torch.export program moved to the
    device), run here with the CPU as the device: the same embeddings as the model's predict."""
    import mlflow

    from pipelines.models import _program_on, _PyfuncEmbedder
    from pipelines.registry import log_embedding_model

    mlflow.set_tracking_uri(mlflow_server)
    torch.manual_seed(2)
    with mlflow.start_run():
        version = log_embedding_model(build_backbone("tiny", 32).eval(), 32, "device-move", {}, {}).version
    uri = f"models:/device-move/{version}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    model = mlflow.pyfunc.load_model(local)
    moved = _PyfuncEmbedder(model, _program_on(local, "cpu"), "cpu", batch=7)
    plain = _PyfuncEmbedder(model)
    faces = np.random.default_rng(0).integers(0, 255, (19, 112, 112, 3), dtype=np.uint8)
    for flip in (True, False):
        np.testing.assert_allclose(moved(faces, flip), plain(faces, flip), atol=1e-6)
    np.testing.assert_allclose(moved.raw(faces), plain.raw(faces), atol=1e-5)

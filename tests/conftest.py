"""Shared fixtures. Tests never reach the internet: S3 is a local moto server, credentials are fake."""

from __future__ import annotations

import os

import pytest

# Fake credentials and no metadata probing: the SDKs must never contact the instance-metadata address.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
    RAY_USAGE_STATS_ENABLED="0", ARCFACE_PROGRESS="0",
    # A local Ray (ray.init) keeps every listener on 127.0.0.1 (read when Ray is first imported).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto's server) on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket; AWS_ENDPOINT_URL points the project's storage layer at the local endpoint."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory):
    """A tiny demo raw dataset in all three layouts (rendered once per session)."""
    from cleaning.synthetic.demo import FORMATS, generate
    from cleaning.synthetic.demo import DemoConfig

    out = tmp_path_factory.mktemp("demo_raw")
    cfg = DemoConfig(identities=24, images_per_identity=12, seed=7, eval_identities=10, eval_pairs=120, workers=2)
    generate(out, cfg, list(FORMATS))
    return out


@pytest.fixture(scope="session")
def demo_shards(demo_raw, tmp_path_factory):
    """Stage-1 output of the tiny demo (VGGFace2 layout: landmarks given, no detector needed)."""
    from dataset import RefinedDataset
    from pipelines.stage1_dask import CleanConfig, run_stage1

    out = tmp_path_factory.mktemp("demo_shards")
    run_stage1(str(demo_raw / "vggface2"), "vggface2", RefinedDataset.create(out),
                   CleanConfig(records_per_partition=120))
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend) on 127.0.0.1, started as a process."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start")
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)

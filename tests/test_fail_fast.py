"""Every command on its own: with nothing running it either starts what it needs or fails
within seconds with one line that names the address and what starts it. And the README's
local-S3 example, run as written."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipelines.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args, env, timeout=60, cwd=ROOT):
    start = time.monotonic()
    proc = subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return proc, time.monotonic() - start


def clean_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_ENDPOINT"))}
    env.update(ARCFACE_STATE_DIR=str(tmp_path / "state"), ARCFACE_LOG_LEVEL="INFO", **extra)
    return env


def one_line_error(proc) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [
    ["promote", "--version", "latest"],
    ["rollback"],
    ["lineage"],
    ["evaluate", "--model", "models:/arcface@champion", "--pairs", "x.bin"],
])
def test_dead_tracking_server_fails_fast_with_one_line(tmp_path, command):
    dead = f"http://127.0.0.1:{free_port()}"
    proc, seconds = run(command, clean_env(tmp_path, MLFLOW_TRACKING_URI=dead))
    line = one_line_error(proc)
    assert seconds < 10, seconds
    assert dead in line and "does not answer" in line and "arcface services up" in line


@pytest.mark.parametrize("address", ["http://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_dead_ray_cluster_fails_fast_with_one_line(tmp_path, demo_shards, address):
    address = address.format(port=free_port())
    # (--cluster-path: the data is said to be on the cluster, so what fails is reaching it)
    for command in (["submit-train", "--data", str(demo_shards), "--no-mlflow", "--cluster-path"],
                    ["train", "--data", str(demo_shards)]):
        proc, seconds = run(command, clean_env(tmp_path, RAY_ADDRESS=address))
        line = one_line_error(proc)
        assert seconds < 10, (command, seconds)
        assert address in line and "no Ray cluster answers" in line


def test_dataset_too_small_fails_once_before_any_worker(tmp_path, demo_shards):
    for command in ("train", "submit-train"):
        proc, seconds = run([command, "--data", str(demo_shards), "--set", "train.batch_size=100000", "--no-mlflow"]
                            if command == "submit-train" else
                            [command, "--data", str(demo_shards), "--set", "train.batch_size=100000"],
                            clean_env(tmp_path))
        line = one_line_error(proc)
        assert seconds < 10, seconds
        assert "make no global batch of 100000" in line and "lower train.batch_size" in line


def test_missing_bucket_and_missing_dataset_are_one_line(tmp_path, demo_raw, s3_endpoint):
    env = clean_env(tmp_path, AWS_ENDPOINT_URL=s3_endpoint)
    proc, seconds = run(["stage1", "--input", str(demo_raw / "vggface2"), "--format", "vggface2",
                         "--out", "s3://no-such-bucket/stage1"], env)
    line = one_line_error(proc)
    assert seconds < 10 and "bucket 'no-such-bucket' does not exist" in line
    proc, seconds = run(["train", "--data", str(tmp_path / "nothing")], env)
    assert "no manifest.json" in one_line_error(proc) and seconds < 10


@pytest.mark.services
def test_registry_commands_start_the_local_server_and_answer_in_one_line(tmp_path):
    """Nothing configured: promote starts the local MLflow server (as submit-train does) and
    the registry's answer (no such model) is one line; then services down."""
    env = clean_env(tmp_path)
    ports = ["--set", f"services.mlflow_port={free_port()}"]
    try:
        proc, _ = run(["promote", "--name", "nobody", "--version", "1", *ports], env, timeout=180)
        lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
        assert proc.returncode == 1 and len(lines) == 1 and "nobody" in lines[0], proc.stderr
        status, _ = run(["services", "status", *ports], env)
        assert status.stdout.splitlines()[1].startswith("mlflow  up")
        proc, seconds = run(["lineage", "--name", "nobody", *ports], env)  # the server is up now: fast
        assert proc.returncode == 1 and seconds < 15
    finally:
        run(["services", "down", *ports], env, timeout=120)


@pytest.mark.services
def test_readme_local_s3_example_runs_as_written(tmp_path, demo_raw):
    """infra/examples/s3_local.sh (the README's example): stage 1 to s3://arcface/..., training
    from it with checkpoints on S3, on the local services."""
    import boto3

    ports = {"ray_port": free_port(), "ray_dashboard_port": free_port(), "mlflow_port": free_port(),
             "s3_port": free_port()}
    config = tmp_path / "ports.toml"  # the example's commands as written; only the ports differ
    config.write_text("[services]\n" + "".join(f"{k} = {v}\n" for k, v in ports.items()))
    env = clean_env(tmp_path, ARCFACE_CONFIG=str(config), INPUT=str(demo_raw / "vggface2"),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env.pop(key, None)  # `services env --s3` must provide them
    try:
        proc = subprocess.run(["bash", str(ROOT / "infra" / "examples" / "s3_local.sh")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['s3_port']}", region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="arcface")["Contents"]]
        assert "demo/stage1/manifest.json" in keys
        assert any(k.startswith("runs/s3-demo/") and k.endswith("backbone.pt") for k in keys)
    finally:
        subprocess.run(CLI + ["services", "down"], env=env, timeout=120, capture_output=True)


def test_no_secret_travels_with_a_submitted_job():
    """Only settings go into a job's runtime env (shown in the Ray dashboard); the local S3
    endpoint's fixed fake keys are the one exception - real keys are never sent."""
    from pipelines.submit import job_environment

    real = {"AWS_ACCESS_KEY_ID": "AKIAREALKEY", "AWS_SECRET_ACCESS_KEY": "realsecret", "AWS_SESSION_TOKEN": "tok",
            "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_USERNAME": "me", "AWS_DEFAULT_REGION": "eu-west-1",
            "MLFLOW_EXPERIMENT_NAME": "x", "HOME": "/root", "ARCFACE_LOG_LEVEL": "DEBUG"}
    for endpoint in ("https://s3.example.com", "http://127.0.0.1:9000"):
        sent = job_environment(dict(real, AWS_ENDPOINT_URL=endpoint))
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"} & set(sent)
        assert sent["AWS_DEFAULT_REGION"] == "eu-west-1" and sent["ARCFACE_LOG_LEVEL"] == "DEBUG" and "HOME" not in sent
    local = job_environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "testing",
                             "AWS_SECRET_ACCESS_KEY": "testing"})
    assert local["AWS_ACCESS_KEY_ID"] == "testing" == local["AWS_SECRET_ACCESS_KEY"]
    assert "AWS_ACCESS_KEY_ID" not in job_environment({"AWS_ENDPOINT_URL": "https://s3.example.com",
                                                       "AWS_ACCESS_KEY_ID": "testing"})
    # No file of this machine is named to the job: the config travels by content (tests/test_submit.py).
    assert "ARCFACE_CONFIG" not in job_environment({"ARCFACE_CONFIG": "site.toml"})


def test_a_model_folder_that_would_run_code_needs_an_explicit_opt_in(tmp_path):
    import subprocess
    import sys

    import pytest as _pytest

    from pipelines.models import UntrustedModel, require_trusted

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: evil\n")
    (folder / "evil.py").write_text("raise SystemExit('code ran')\n")
    with _pytest.raises(UntrustedModel, match="--trust-model-code"):
        require_trusted(str(folder), trust_code=False)
    require_trusted(str(folder), trust_code=True)
    require_trusted("models:/arcface@champion", trust_code=False)  # the registry you configured
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--model", str(folder), "--pairs",
                          str(tmp_path / "none.bin")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "--trust-model-code" in run.stderr and "code ran" not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr


def test_a_refused_pairs_file_is_one_line_and_exit_1(tmp_path):
    """A .bin that would run code is refused before any object is built, and the CLI says
    so in one line (no traceback), exit 1."""
    import dataclasses
    import pickle
    import subprocess
    import sys

    import torch

    from pipelines.training.config import TrainConfig
    from pipelines.training.step import Trainee

    class Boom:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([Boom(), b"x"], [True]), protocol=2))
    trainee = Trainee(TrainConfig(backbone="tiny", embedding_size=16, workers=1), 4, 0, 1, torch.device("cpu"))
    model = tmp_path / "model"
    model.mkdir()
    trainee.save(str(model), {"step": 0, "world": 1, "config": dataclasses.asdict(trainee.cfg)})
    run = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--model", str(model), "--pairs",
                          str(evil)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "refusing to load" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "pwned").exists()

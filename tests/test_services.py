"""`arcface services up|status|down` against real processes (Ray head, MLflow server, moto S3)."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from infra.local_services import group_alive, port_open

pytestmark = pytest.mark.services

# Ports apart from the defaults so a developer's own services (or CI's) are untouched.
PORTS = ["--set", "services.ray_port=6391", "--set", "services.ray_dashboard_port=8276",
         "--set", "services.mlflow_port=5056", "--set", "services.s3_port=9056"]


def arcface(state_dir, *args, check=True):
    env = dict(os.environ, ARCFACE_STATE_DIR=str(state_dir))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, capture_output=True,
                          text=True, check=check, timeout=300)


def test_up_status_down_leaves_nothing(tmp_path):
    state = tmp_path / "state"
    try:
        up = arcface(state, "services", "up", "--s3", *PORTS)
        again = arcface(state, "services", "up", "--s3", *PORTS)  # idempotent
        assert "already answering" in again.stderr
        status = arcface(state, "services", "status", *PORTS).stdout
        for name, port in (("ray", 8276), ("mlflow", 5056), ("s3", 9056)):
            line = next(l for l in status.splitlines() if l.startswith(name))
            assert " up " in line and f"127.0.0.1:{port}" in line, status
        with urllib.request.urlopen("http://127.0.0.1:5056/health", timeout=5) as resp:
            assert resp.status == 200
        pids = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "mlflow", "s3")}
        assert all(group_alive(pid) for pid in pids.values())
        assert (state / "mlflow" / "mlflow.db").exists() and (state / "logs" / "ray.log").exists()
        assert "state and logs" in up.stdout
    finally:
        stopped = arcface(state, "services", "down", *PORTS, check=False)
    for pid in pids.values():
        assert not group_alive(pid), "a service process outlived `down`"
    assert "SIGKILL" not in stopped.stderr, stopped.stderr  # each stopped on its SIGTERM
    for port in (6391, 8276, 5056, 9056):
        assert not port_open("127.0.0.1", port)
    status = arcface(state, "services", "status", *PORTS).stdout
    assert " up " not in status


def test_taken_port_is_reported_clearly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = arcface(tmp_path, "services", "up", "--only", "mlflow", "--set", f"services.mlflow_port={port}",
                         check=False)
    assert result.returncode == 1
    assert f"port 127.0.0.1:{port} is taken" in result.stderr
    assert "services.mlflow_port" in result.stderr


JOIN = """
import os
from pipelines.ray_connect import connect
try:
    connect(os.environ["RAY_ADDRESS"], num_cpus=2)
except ConnectionError as exc:
    print("REFUSED", exc)
    raise SystemExit(0)
import ray
print("GCS", ray.get_runtime_context().gcs_address)
print("TASK", ray.get(ray.remote(lambda: 41 + 1).remote()))
print("RAY_ADDRESS", os.environ["RAY_ADDRESS"])
"""


def test_a_driver_joins_the_local_head_with_services_env(tmp_path):
    """After `eval "$(arcface services env)"`, train and refine (every driver: they all join
    through pipelines/ray_connect.connect) once failed with "Invalid Ray address:
    'http://127.0.0.1:8265'": ray.init reads RAY_ADDRESS itself and takes no dashboard URL,
    and a driver without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 looked for the loopback-only
    head on the machine's external address. The exports alone must be enough."""
    state = tmp_path / "state"
    ports = ["--set", "services.ray_port=6393", "--set", "services.ray_dashboard_port=8278"]
    try:
        arcface(state, "services", "up", "--only", "ray", *ports)
        exports = arcface(state, "services", "env", *ports).stdout
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        assert env["RAY_ADDRESS"] == "http://127.0.0.1:8278" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        joined = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=180)
        # A dashboard URL of no cluster on this machine: refused in one line, not another cluster joined.
        wrong = subprocess.run([sys.executable, "-c", JOIN], env=dict(env, RAY_ADDRESS="http://127.0.0.1:8279"),
                               capture_output=True, text=True, timeout=180)
    finally:
        arcface(state, "services", "down", *ports, check=False)
    assert joined.returncode == 0, joined.stderr[-3000:]
    lines = joined.stdout.splitlines()
    assert lines == ["GCS 127.0.0.1:6393", "TASK 42", "RAY_ADDRESS http://127.0.0.1:8278"], joined.stdout
    assert wrong.returncode == 0, wrong.stderr[-3000:]
    assert wrong.stdout.startswith("REFUSED RAY_ADDRESS is the dashboard http://127.0.0.1:8279, but the Ray cluster "
                                   "on this machine serves its dashboard on port 8278"), wrong.stdout


# A service's process group: a leader that, on SIGTERM, stops its child itself (as `ray start
# --block` stops its raylet and GCS in order), or (LEAVES_A_STRAGGLER) exits and leaves behind a
# child that ignores SIGTERM. Each process notes the SIGTERMs it receives.
GROUP = """
import signal, subprocess, sys, time
from pathlib import Path
folder, leaves_a_straggler = Path(sys.argv[1]), sys.argv[2] == "1"
child = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (folder / "child-got-sigterm").touch())
(folder / "child-ready").touch()
time.sleep(600)
''', str(folder)])
def stop(*_):
    (folder / "leader-got-sigterm").touch()
    if not leaves_a_straggler:
        child.kill()
        child.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while not (folder / "child-ready").exists():
    time.sleep(0.05)
(folder / "leader-ready").touch()
time.sleep(600)
"""


def _start_group(folder, leaves_a_straggler: bool) -> int:
    folder.mkdir()
    leader = subprocess.Popen([sys.executable, "-c", GROUP, str(folder), "1" if leaves_a_straggler else "0"],
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while not (folder / "leader-ready").exists():
        assert time.monotonic() < deadline and leader.poll() is None, "the test's process group did not start"
        time.sleep(0.05)
    return leader.pid


def test_down_signals_a_services_leader_before_its_group(tmp_path, caplog, monkeypatch):
    """`down` sends SIGTERM to the leader alone first: a group-wide SIGTERM reached Ray's GCS
    before its raylet, whose shutdown then waited for the GCS until SIGKILL (30 s on every
    `services down`). Stragglers a leader leaves get the group's SIGTERM, then SIGKILL."""
    import logging
    import signal

    from infra import local_services

    caplog.set_level(logging.WARNING, logger="infra.local_services")
    orderly = _start_group(tmp_path / "orderly", leaves_a_straggler=False)
    local_services.LocalServices._kill_group("orderly", orderly)
    assert not group_alive(orderly)
    assert sorted(p.name for p in (tmp_path / "orderly").glob("*-got-sigterm")) == ["leader-got-sigterm"]
    assert "SIGKILL" not in caplog.text

    monkeypatch.setattr(local_services, "STOP_STEPS", ((signal.SIGTERM, False, 5.0), (signal.SIGTERM, True, 0.5),
                                                       (signal.SIGKILL, True, 10.0)))
    straggling = _start_group(tmp_path / "straggling", leaves_a_straggler=True)
    local_services.LocalServices._kill_group("straggling", straggling)
    assert not group_alive(straggling)
    assert sorted(p.name for p in (tmp_path / "straggling").glob("*-got-sigterm")) == ["child-got-sigterm",
                                                                                       "leader-got-sigterm"]
    assert "straggling: still running after SIGTERM; sending SIGKILL" in caplog.text

"""Local services as real processes: a Ray head, an MLflow tracking server, an S3 endpoint.

`arcface services up|down|status` drives this. Every service binds to 127.0.0.1 by
default; pids and logs live under the project-local state folder (`services.state_dir`).
`up` is idempotent: a service that already answers is left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from arcface_core.settings import setting


log = logging.getLogger(__name__)


_PORT = "[1, 65535]"


@dataclass
class ServicesConfig:
    """Where the local services run (`arcface services up`) and which shared ones to use."""

    state_dir: str = setting(".arcface", doc=(
        "folder for everything local services write: pids, logs, MLflow's SQLite db and artifacts"))
    host: str = setting("127.0.0.1", doc="address the local services bind to and are reached at")
    ray_port: int = setting(6379, range=_PORT, doc="the local Ray head's GCS port")
    ray_dashboard_port: int = setting(8265, range=_PORT, doc=(
        "the local Ray dashboard's port (jobs are submitted there)"))
    ray_num_cpus: int = setting(2, range="[1, inf)", doc="CPUs the local Ray head offers to tasks and actors")
    # Ray refuses an object store below 75 MiB.
    ray_object_store_bytes: int = setting(1_000_000_000, range=f"[{75 * 2**20}, inf)",
                                          doc="the local Ray head's object store, in bytes")
    mlflow_port: int = setting(5000, range=_PORT, doc="the local MLflow tracking server's port")
    mlflow_tracking_uri: str = setting("", doc=(
        "a shared tracking server (https://...), set from MLFLOW_TRACKING_URI; empty: commands use "
        "(and start) the local server of `arcface services up`"))
    ray_address: str = setting("", doc=(
        "a Ray cluster (GCS address or dashboard URL), set from RAY_ADDRESS; empty: a local Ray "
        "(the head of `arcface services up` for submitted jobs)"))
    s3_port: int = setting(9000, range=_PORT, doc="the local S3 endpoint's port (`arcface services up --s3`)")
    s3_bucket: str = setting("arcface", doc="the bucket `arcface services up --s3` creates on the local endpoint")
    start_timeout_s: float = setting(90.0, range="(0, inf)", doc="seconds a starting local service has to answer")

SERVICES = ("ray", "mlflow", "s3")


class ServiceError(RuntimeError):
    pass


# moto accepts any keys; these are the ones its documentation uses. Local endpoint only.
LOCAL_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}


def _bin(name: str) -> str:
    """A console script from the same environment as this Python (venv first, then PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"'{name}' is not installed in this environment; run `make setup`")
    return found


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0, protected_ok: bool = False) -> bool:
    """Whether `url` answers. With `protected_ok`, 401 counts: the server is up and asks
    for credentials (Ray's dashboard does once a Ray auth token exists on the machine)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except urllib.error.HTTPError as exc:
        return protected_ok and exc.code == 401
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _quiet_env() -> dict:
    env = dict(os.environ)
    # Neither Ray nor MLflow may phone home: this project runs on closed networks too.
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        # Ray only keeps every listener on 127.0.0.1 with this set (see STACK-NOTES).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    # Jobs on the local head run `arcface` (pipelines/submit.py), as on a cluster: this
    # environment's scripts come first on the PATH they inherit.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The local head asks clients for Ray's auth token (~/.ray/auth_token); clients started
    # with ray_client_env() present it. A user's explicit RAY_AUTH_MODE wins.
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def ray_client_env() -> dict:
    """Environment for processes that talk to the local head (ray job submit, ray.init)."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


@dataclass
class Status:
    name: str
    up: bool
    address: str
    detail: str = ""


class LocalServices:
    """The local Ray head, MLflow server and S3 endpoint (`arcface services`), from the
    services section alone."""

    def __init__(self, cfg: ServicesConfig):
        self.cfg = cfg
        self.root = Path(cfg.state_dir).resolve()
        self.logs = self.root / "logs"

    # -- addresses -----------------------------------------------------------------
    @property
    def ray_dashboard(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.ray_dashboard_port}"

    @property
    def ray_address(self) -> str:
        return f"{self.cfg.host}:{self.cfg.ray_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.s3_port}"

    def env(self, with_s3: bool = False) -> dict[str, str]:
        """What a client needs for the local services. With `with_s3`: the local endpoint and
        moto's test credentials (local-only: they open nothing anywhere else)."""
        # RAY_AUTH_MODE: the local head asks its clients for the machine's Ray token.
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the head listens on 127.0.0.1 only, and a driver
        # joining it (train, refine: RAY_ADDRESS a dashboard URL means this node's cluster)
        # must keep 127.0.0.1 as it is; without it Ray swaps in the machine's external address.
        env = {"RAY_ADDRESS": self.ray_dashboard, "MLFLOW_TRACKING_URI": self.mlflow_uri, "RAY_AUTH_MODE": "token",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        if with_s3:
            env.update(AWS_ENDPOINT_URL=self.s3_endpoint, **LOCAL_S3_ENV)
        return env

    # -- health ----------------------------------------------------------------------
    def ray_up(self) -> bool:
        return http_ok(f"{self.ray_dashboard}/api/version", protected_ok=True)

    def mlflow_up(self) -> bool:
        return http_ok(f"{self.mlflow_uri}/health")

    def s3_up(self) -> bool:
        return http_ok(f"{self.s3_endpoint}/moto-api/")

    def status(self) -> list[Status]:
        return [
            Status("ray", self.ray_up(), self.ray_dashboard, f"gcs {self.ray_address}"),
            Status("mlflow", self.mlflow_up(), self.mlflow_uri, f"store {self.root / 'mlflow'}"),
            Status("s3", self.s3_up(), self.s3_endpoint, "moto"),
        ]

    # -- start -------------------------------------------------------------------------
    def up(self, services: tuple[str, ...] = ("ray", "mlflow")) -> list[Status]:
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in services:
            if name not in SERVICES:
                raise ServiceError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")
            getattr(self, f"_start_{name}")()
        return [s for s in self.status() if s.name in services]

    def _check_port_free(self, name: str, port: int, key: str) -> None:
        if port_open(self.cfg.host, port):
            raise ServiceError(
                f"{name}: port {self.cfg.host}:{port} is taken by another process that does not "
                f"answer as {name}. Stop it, or choose another port with --set services.{key}=PORT"
            )

    def _wait(self, name: str, check, log_file: Path, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise ServiceError(f"{name} did not start (see {log_file}):\n{tail}")

    def _start_ray(self) -> None:
        if self.ray_up():
            log.info("ray: already answering at %s", self.ray_dashboard)
            return
        self._check_port_free("ray", self.cfg.ray_port, "ray_port")
        self._check_port_free("ray dashboard", self.cfg.ray_dashboard_port, "ray_dashboard_port")
        log_file = self.logs / "ray.log"
        cmd = [
            _bin("ray"), "start", "--head",
            f"--node-ip-address={self.cfg.host}",
            f"--port={self.cfg.ray_port}",
            f"--num-cpus={self.cfg.ray_num_cpus}",
            f"--object-store-memory={self.cfg.ray_object_store_bytes}",
            f"--dashboard-host={self.cfg.host}",
            f"--dashboard-port={self.cfg.ray_dashboard_port}",
            "--disable-usage-stats",
        ]
        subprocess.run([_bin("ray"), "get-auth-token", "--generate"], env=_quiet_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # token file, never printed
        log.info("ray: starting head (%s)", log_file)
        # --block keeps `ray start` in the foreground as the parent of the head's processes, so
        # `down` stops exactly this head (its process group), not every Ray on the machine.
        proc = self._spawn("ray", cmd + ["--block"])
        self._wait("ray", self.ray_up, log_file, proc)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log_file = self.logs / f"{name}.log"
        out = open(log_file, "ab")
        # Own process group so `down` can stop the server and every worker it forked.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_quiet_env(), start_new_session=True, cwd=self.root)
        (self.root / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def _start_mlflow(self) -> None:
        if self.mlflow_up():
            log.info("mlflow: already answering at %s", self.mlflow_uri)
            return
        self._check_port_free("mlflow", self.cfg.mlflow_port, "mlflow_port")
        store = self.root / "mlflow"
        (store / "artifacts").mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination", str(store / "artifacts"),
            "--host", self.cfg.host, "--port", str(self.cfg.mlflow_port),
            "--workers", "1",
        ]
        log.info("mlflow: starting server (%s)", self.logs / "mlflow.log")
        proc = self._spawn("mlflow", cmd)
        self._wait("mlflow", self.mlflow_up, self.logs / "mlflow.log", proc)

    def _start_s3(self) -> None:
        if self.s3_up():
            log.info("s3: already answering at %s", self.s3_endpoint)
            self._create_bucket()
            return
        self._check_port_free("s3", self.cfg.s3_port, "s3_port")
        cmd = [_bin("moto_server"), "-H", self.cfg.host, "-p", str(self.cfg.s3_port)]
        log.info("s3: starting moto server (%s)", self.logs / "s3.log")
        proc = self._spawn("s3", cmd)
        self._wait("s3", self.s3_up, self.logs / "s3.log", proc)
        self._create_bucket()

    def _create_bucket(self) -> None:
        """The default bucket, so that `s3://BUCKET/...` works right after `up --s3`."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=LOCAL_S3_ENV["AWS_DEFAULT_REGION"],
                              aws_access_key_id=LOCAL_S3_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=LOCAL_S3_ENV["AWS_SECRET_ACCESS_KEY"])
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.cfg.s3_bucket not in existing:
            client.create_bucket(Bucket=self.cfg.s3_bucket)
            log.info("s3: created bucket %s", self.cfg.s3_bucket)

    # -- stop --------------------------------------------------------------------------
    def down(self) -> None:
        for name in ("s3", "mlflow", "ray"):
            self._stop_pidfile(name)

    def _stop_pidfile(self, name: str) -> None:
        pid_file = self.root / f"{name}.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().strip() or 0)
        if pid > 0:
            self._kill_group(name, pid)
        pid_file.unlink(missing_ok=True)
        log.info("%s: stopped", name)

    @staticmethod
    def _kill_group(name: str, pid: int) -> None:
        """Stop a service's process group: SIGTERM to its leader first, then to the group's
        stragglers, SIGKILL last (STOP_STEPS). The leader (`ray start --block`, `mlflow server`,
        moto) stops its own processes in order; a SIGTERM to the whole group at once killed Ray's
        GCS before its raylet, whose shutdown then waited for the GCS until our SIGKILL (30 s on
        every `services down`, against about 3 s this way)."""
        for sig, whole_group, wait_s in STOP_STEPS:
            if not group_alive(pid):
                return
            if not whole_group and not _leads_its_group(pid):
                continue  # the leader is gone (its pid may be another process's by now)
            if sig == signal.SIGKILL:
                log.warning("%s: still running after SIGTERM; sending SIGKILL", name)
            try:
                os.killpg(pid, sig) if whole_group else os.kill(pid, sig)
            except ProcessLookupError:
                pass  # the leader is gone; its stragglers get the next step
            except PermissionError as exc:
                raise ServiceError(f"{name}: cannot stop process group {pid}: {exc}") from exc
            # The leader's step ends when the leader is gone (stragglers go to the group step).
            done = (lambda: not group_alive(pid)) if whole_group else (lambda: not process_alive(pid))
            deadline = time.monotonic() + wait_s
            while not done() and time.monotonic() < deadline:
                time.sleep(0.1)


# -- what commands need: a tracking server and a Ray cluster ----------------------------------

def without_credentials(uri: str) -> str:
    """`uri` without `user:password@` (for error lines and a job's visible environment)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def tracking_uri(cfg: ServicesConfig, start: bool = True) -> str:
    """The MLflow tracking server commands use: the configured one (MLFLOW_TRACKING_URI or
    services.mlflow_tracking_uri), which must answer within seconds, else the local server
    of `arcface services up` (started here when `start` and it is not running)."""
    uri = cfg.mlflow_tracking_uri
    if uri:
        if uri.startswith(("http://", "https://")) and not http_ok(f"{uri.rstrip('/')}/health", timeout=5.0,
                                                                    protected_ok=True):
            raise ServiceError(f"the MLflow tracking server at {without_credentials(uri)} (MLFLOW_TRACKING_URI / "
                               "services.mlflow_tracking_uri) does not answer: start it, or unset it to use "
                               "the local one (`arcface services up`)")
        return uri
    services = LocalServices(cfg)
    if not services.mlflow_up():
        if not start:
            raise ServiceError(f"no MLflow tracking server at {services.mlflow_uri}: start it with "
                               "`arcface services up` (or set MLFLOW_TRACKING_URI)")
        services.up(("mlflow",))
    return services.mlflow_uri


def check_ray(address: str, dashboard_port: int = 8265) -> None:
    """A configured Ray address must answer within seconds (ray.init would wait minutes)."""
    if not address or address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        ok = http_ok(f"{address.rstrip('/')}/api/version", timeout=5.0, protected_ok=True)
    else:
        hostport = address.split("://")[-1]
        host, _, port = hostport.rpartition(":")
        ok = port.isdigit() and _tcp_ok(host or "127.0.0.1", int(port))
    if not ok:
        raise ServiceError(f"no Ray cluster answers at {address} (RAY_ADDRESS / services.ray_address): start it "
                           "(`arcface services up` for the local head), or unset it to use a local Ray")


def _tcp_ok(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# How `down` stops a service: (signal, to the whole group rather than its leader, seconds to wait).
STOP_STEPS = ((signal.SIGTERM, False, 20.0), (signal.SIGTERM, True, 10.0), (signal.SIGKILL, True, 10.0))


def _leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _stat_fields(stat_file: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the parenthesised command (state ppid pgrp ...);
    None when the process is gone."""
    try:
        stat = stat_file.read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (see group_alive)."""
    if not Path("/proc").exists():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    fields = _stat_fields(Path("/proc") / str(pid) / "stat")
    return fields is not None and fields[0] != "Z"


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in the process group.

    Zombies are ignored: in containers whose init does not reap orphans they linger, but
    they hold no ports, memory or files.
    """
    proc = Path("/proc")
    if not proc.exists():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in proc.iterdir():
        fields = _stat_fields(entry / "stat") if entry.name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False

"""Connect this driver to Ray: the cluster in RAY_ADDRESS, else a local instance on 127.0.0.1."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str, num_cpus: int) -> None:
    """`address` is `services.ray_address` (from RAY_ADDRESS, which `ray job submit` sets to
    the cluster's GCS address); a dashboard URL (http://HOST:8265, as `arcface services env`
    exports for job submission) means the cluster this machine belongs to ("auto"). Without
    an address a local Ray starts with every listener on 127.0.0.1
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 must be set before Ray is first imported; see
    STACK-NOTES), with `num_cpus` CPUs."""
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address.startswith(("http://", "https://")):
        log.info("RAY_ADDRESS is a dashboard URL: joining the local node's cluster (address='auto')")
        address = "auto"
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A local Ray with its dashboard on a free port of 127.0.0.1, and every worker told where
    # it is: Ray Train's placement-group cleaner polls the State API (served by the
    # dashboard), and without RAY_API_SERVER_ADDRESS the State API looks for the cluster
    # in /tmp/ray/ray_current_cluster, which names the last `ray start` head (often long
    # dead), and times out there again and again.
    port = _free_port()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""Connect this driver to Ray: the cluster in RAY_ADDRESS, else a local instance on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

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
        _join_by_dashboard(address)
        return
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


def _join_by_dashboard(url: str) -> None:
    """Join the cluster this machine belongs to ("auto"), given its dashboard URL. ray.init
    reads RAY_ADDRESS itself even when told "auto", and refuses an http:// one ("Invalid Ray
    address", what `eval "$(arcface services env)"` used to cost train and refine), so it is
    hidden from that call; the cluster found must serve the dashboard named (another local
    Ray, say a test's, would be the wrong one)."""
    import ray

    log.info("RAY_ADDRESS is a dashboard URL: joining the local node's cluster (address='auto')")
    hidden = os.environ.pop("RAY_ADDRESS", None)
    try:
        # Ray Train's placement-group cleaner asks the State API (the dashboard) about the
        # run; told where it is, it does not look for "the latest cluster" at every poll.
        context = ray.init(address="auto", log_to_driver=True,
                           runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": url.rstrip("/")}})
    except ConnectionError as exc:
        raise ConnectionError(f"RAY_ADDRESS is the dashboard {url}, but no Ray cluster runs on this machine to "
                              f"join ({str(exc).splitlines()[0]}); set RAY_ADDRESS to the cluster's GCS address "
                              "(HOST:6379) from elsewhere") from None
    finally:
        if hidden is not None:
            os.environ["RAY_ADDRESS"] = hidden
    served = (context.dashboard_url or "").rpartition(":")[2]
    wanted = urlparse(url).port or (443 if url.startswith("https") else 80)
    if served and served != str(wanted):
        ray.shutdown()
        raise ConnectionError(f"RAY_ADDRESS is the dashboard {url}, but the Ray cluster on this machine serves its "
                              f"dashboard on port {served}: set RAY_ADDRESS to the GCS address (HOST:PORT) of the "
                              "cluster meant")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

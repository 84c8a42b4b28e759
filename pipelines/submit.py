"""`arcface submit COMMAND ...`: run a long command as a Ray job, followed from here.

A user's cluster shares nothing with the machine they type on but S3 and the service
addresses (DESIGN.md, "The cluster, as users have it"). So a submitted job:
  * runs the cluster's installed `arcface` (never this machine's interpreter or checkout;
    `--working-dir DIR` uploads code for development, and then runs it with the cluster's
    Python);
  * reads the effective configuration by content: every section but [services] (which
    describes this machine) travels as TOML in ARCFACE_CONFIG_TOML, with --config and --set
    already applied; nothing names a config file of this machine;
  * gets paths it can read: a local input or output path is refused here, in one line,
    unless it is an s3:// URI (or a models:/ / runs:/ registry URI) or `--cluster-path`
    asserts that it exists on the cluster's nodes. The one exception is the local head that
    `arcface services up` started from this machine's state folder: it shares this
    machine's files, so paths are made absolute and sent.
Jobs are submitted with Ray's Jobs SDK; their logs are followed here until they end, and
the exit code is the job's. Ctrl-C stops following, not the job, and says how to stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("arcface")

# Values that name no file of this machine.
REMOTE_PREFIXES = ("s3://", "models:/", "runs:/")
# Values of path options that are words, not paths.
KEYWORDS = {"--resume": {"latest"}}
# Config settings that hold paths, by the command that reads them.
CONFIG_PATHS = {"train": ("train.storage", "train.init_backbone"),
                "clean-data": ("denoise.exclude_identities", "train.init_backbone"),
                "denoise": ("denoise.exclude_identities",)}


class SubmitRefused(ValueError):
    """What would make the job fail on the cluster, said before anything is submitted."""


@dataclass
class Target:
    dashboard: str  # http://HOST:PORT of the cluster's Ray dashboard (the Jobs API)
    local_head: bool  # the head `arcface services up` started here: it sees this machine's files


def _secret(name: str) -> bool:  # by shape, not by a list that a new variable slips past
    return any(word in name for word in ("SECRET", "TOKEN", "PASSWORD", "KEY_ID", "AUTH", "CREDENTIAL"))


def job_environment(environ) -> dict:
    """What of this shell's environment travels with a submitted job. Settings do; secrets
    do not (a job's runtime env is shown in the Ray dashboard; credentials come from the
    cluster: instance role, IRSA, the nodes' env). The one exception is the local S3
    endpoint's fixed fake keys ("testing"), which are no secret; real keys are never sent,
    not even to a local endpoint. No config file travels by path (ARCFACE_CONFIG names a
    file of this machine): the effective configuration travels by content instead."""
    from infra.local_services import LOCAL_S3_ENV

    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or ""
    local_s3 = endpoint.startswith(("http://127.0.0.1", "http://localhost"))
    return {k: v for k, v in environ.items()
            if (k.startswith(("MLFLOW_", "AWS_")) or k in ("ARCFACE_LOG_LEVEL", "ARCFACE_PROGRESS"))
            and (not _secret(k) or (local_s3 and LOCAL_S3_ENV.get(k) == v))}


def cluster_config(cfg, keep_derived: bool = False) -> str:
    """The effective config as the job reads it: every section but [services]. A value this
    machine derived from its own [services] (train.storage under its state folder) is left
    for the job to derive on its side, unless `keep_derived` (the local head shares it)."""
    import copy

    from pipelines.config import to_toml

    sent = copy.deepcopy(cfg)
    derived = cfg.origins.get("train.storage", "").startswith("derived")
    if not keep_derived and derived and cfg.train.storage == os.path.join(cfg.services.state_dir, "runs"):
        sent.train.storage = ""  # (not when --storage replaced it since)
    kept, inside = [], False
    for line in to_toml(sent).splitlines():
        if line.startswith("["):  # a table header: [services] and its sub-tables stay here
            inside = line == "[services]" or line.startswith("[services.")
        if not inside:
            kept.append(line)
    return "\n".join(kept) + "\n"


def resolve_target(cfg) -> Target:
    """The cluster in RAY_ADDRESS (services.ray_address), else the local head; nothing is
    contacted or started here (`reach` does that, once the job is known to be runnable)."""
    from infra.local_services import LocalServices

    services = LocalServices(cfg.services)
    address = cfg.services.ray_address
    if not address:
        return Target(services.ray_dashboard, local_head=True)
    if not address.startswith("http"):
        # A GCS address (host:6379 or ray://host:10001): jobs go to that host's dashboard.
        host = address.split("://")[-1].split(":")[0]
        address = f"http://{host}:{cfg.services.ray_dashboard_port}"
    ours = address.rstrip("/") == services.ray_dashboard and (services.root / "ray.pid").exists()
    return Target(address.rstrip("/"), local_head=ours)


def reach(cfg, target: Target) -> None:
    """The configured cluster must answer within seconds; the local head is started if needed."""
    from infra.local_services import LocalServices, check_ray

    if cfg.services.ray_address:
        check_ray(cfg.services.ray_address)
    else:
        LocalServices(cfg.services).up(("ray",))


def _is_path_value(flag: str, value: str) -> bool:
    return not value.startswith(REMOTE_PREFIXES) and value not in KEYWORDS.get(flag, set())


def place_paths(argv: list[str], path_flags: tuple[str, ...], target: Target, cluster_path: bool) -> list[str]:
    """`argv` with every path option's value checked for the cluster: kept when remote (s3://),
    made absolute for the local head, kept as typed with `cluster_path`, else refused."""
    out: list[str] = []
    flag = ""  # the path option whose values are being read (nargs options take several)
    for word in argv:
        if word.startswith("-"):
            name, eq, inline = word.partition("=")
            flag = name if name in path_flags else ""
            if flag and eq:
                out.append(f"{name}={_place(name, inline, target, cluster_path)}")
                flag = ""
                continue
            out.append(word)
            continue
        out.append(_place(flag, word, target, cluster_path) if flag else word)
    return out


def _place(flag: str, value: str, target: Target, cluster_path: bool) -> str:
    if not _is_path_value(flag, value) or cluster_path:
        return value
    if target.local_head:
        return os.path.abspath(value)
    raise SubmitRefused(f"{flag} {value}: a path on this machine, which the cluster's nodes cannot see; give an "
                        "s3:// URI, or add --cluster-path if this path exists on the cluster's nodes")


def check_config_paths(command: str, cfg, target: Target, cluster_path: bool) -> None:
    for dotted in CONFIG_PATHS.get(command, ()):
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if not value or not _is_path_value("", value) or cluster_path:
            continue
        if target.local_head:
            setattr(getattr(cfg, section), key, os.path.abspath(value))
            continue
        flag = {"train.storage": "--storage", "train.init_backbone": "--init-backbone"}.get(dotted)
        hint = f" (or {flag})" if flag else ""
        raise SubmitRefused(f"{dotted} is {value}, a path on this machine, which the cluster's nodes cannot see; "
                            f"set it to an s3:// URI with --set {dotted}=s3://...{hint}, or add --cluster-path if it "
                            "exists on the cluster's nodes")


def strip_config_options(argv: list[str]) -> list[str]:
    """`argv` without --config FILE and --set K=V: their effect travels in the config's content."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--config", "--set"):
            skip = True
            continue
        if word.startswith(("--config=", "--set=")):
            continue
        out.append(word)
    return out


@dataclass
class SubmitOptions:
    working_dir: str = ""
    cluster_path: bool = False
    no_wait: bool = False
    no_mlflow: bool = False


def entrypoint(command: str, argv: list[str], working_dir: str) -> str:
    import shlex

    # With uploaded code the job runs it (`python -m` puts the working dir first on the
    # path) with the cluster's Python; otherwise the cluster's installed `arcface`.
    program = ["python", "-m", "pipelines.cli"] if working_dir else ["arcface"]
    return shlex.join(program + [command, *argv])


def submit(command: str, argv: list[str], path_flags: tuple[str, ...], cfg, options: SubmitOptions) -> int:
    """Submit `arcface COMMAND ARGV` (already parsed and checked by the caller) and follow it."""
    from infra.local_services import tracking_uri, without_credentials

    target = resolve_target(cfg)
    cluster_path = options.cluster_path
    args = place_paths(strip_config_options(argv), path_flags, target, cluster_path)
    check_config_paths(command, cfg, target, cluster_path)
    reach(cfg, target)
    env_vars = job_environment(os.environ)
    if any(_secret(k) and k not in env_vars for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))):
        log.info("credentials in this shell are not sent with the job; the cluster's nodes need their own")
    env_vars["ARCFACE_CONFIG_TOML"] = cluster_config(cfg, keep_derived=target.local_head)
    if options.working_dir:
        from pipelines.version import code_version

        env_vars["ARCFACE_CODE_VERSION"] = code_version()  # the uploaded code's, not the cluster's
    if cfg.services.mlflow_tracking_uri or (command == "train" and not options.no_mlflow):
        # The configured server (which must answer), else the local one, started if needed;
        # user:password in the URI stays here (the dashboard shows a job's environment).
        uri = tracking_uri(cfg.services)
        if without_credentials(uri) != uri:
            log.info("the tracking URI's credentials are not sent with the job (MLFLOW_TRACKING_USERNAME/PASSWORD "
                     "on the cluster's nodes)")
        env_vars["MLFLOW_TRACKING_URI"] = without_credentials(uri)
    runtime_env: dict = {"env_vars": env_vars}
    if options.working_dir:
        runtime_env["working_dir"] = os.path.abspath(options.working_dir)
    entry = entrypoint(command, args, options.working_dir)
    name = getattr(cfg.train, "name", "") if command == "train" else ""
    job_id = "-".join(p for p in ("arcface", command, name, time.strftime("%Y%m%d-%H%M%S")) if p)
    client = _client(target)
    log.info("submitting %s to %s: %s", job_id, target.dashboard, entry)
    _submit_with_retry(client, entry, runtime_env, job_id)
    print(f"submitted {job_id} to {target.dashboard}", flush=True)
    if options.no_wait:
        print(f"follow it: ray job logs --address {target.dashboard} --follow {job_id}")
        return 0
    return follow(client, job_id, target.dashboard)


def _client(target: Target):
    if target.local_head:  # the local head asks for Ray's auth token (infra/local_services.py)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(target.dashboard)


def _submit_with_retry(client, entry: str, runtime_env: dict, job_id: str) -> None:
    # A head that has just started answers before its job agent does ("No available agent"):
    # that one answer is worth waiting for; any other refusal is final. A loaded head took
    # over two minutes once (a 2-core machine running other jobs), hence four.
    deadline = time.monotonic() + 240
    waiting_said = False
    while True:
        try:
            client.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=job_id)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitRefused(f"the cluster refused the job: {str(exc).strip().splitlines()[-1]}") from None
            if not waiting_said:
                log.info("the cluster's job agent is not up yet; trying again for up to 4 minutes")
                waiting_said = True
            time.sleep(3)


def follow(client, job_id: str, dashboard: str) -> int:
    """Print the job's logs until it ends; its exit code (Ctrl-C: stop following, say how to stop)."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
        info = client.get_job_info(job_id)
        while not info.status.is_terminal():  # the log stream can close a moment before the status
            time.sleep(1)
            info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running. Follow it again: ray job logs --address {dashboard} "
              f"--follow {job_id}; stop it: ray job stop --address {dashboard} {job_id}", file=sys.stderr)
        return 130
    status = str(info.status.value if hasattr(info.status, "value") else info.status).lower()
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "succeeded" and info.message else ""))
    if status == "succeeded":
        return 0
    code = info.driver_exit_code
    return code if isinstance(code, int) and code > 0 else 1


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--working-dir", metavar="DIR",
                        help="upload this folder's code with the job and run it (development); by default the "
                             "cluster's installed arcface runs")
    parser.add_argument("--cluster-path", action="store_true",
                        help="the local paths given exist on the cluster's nodes: send them as typed")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; do not follow the logs")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="train: do not start the local MLflow server when MLFLOW_TRACKING_URI is unset")


def options_from(args) -> SubmitOptions:
    return SubmitOptions(working_dir=args.working_dir or "", cluster_path=args.cluster_path, no_wait=args.no_wait,
                         no_mlflow=args.no_mlflow)


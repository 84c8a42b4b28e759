"""infra/: the cluster configs and manifests are valid, the runbook speaks the real CLI, and
the multi-node rehearsal runs."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SECRET_WORDS = re.compile(r"(secret|password|token|access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.I)


def test_ray_cluster_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())
    # What `ray up` does first: fill in the provider's defaults, then check Ray's schema.
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}  # the head trains nothing
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))]
    assert gpu_types, "GPU worker node types"
    for name, t in types.items():  # S3 by instance role on every node, no keys anywhere
        assert "IamInstanceProfile" in t["node_config"], name
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert not SECRET_WORDS.search((INFRA / "ray" / "cluster-aws.yaml").read_text())


def test_ray_schema_rejects_a_broken_config():
    from ray.autoscaler._private.util import validate_config

    import jsonschema

    config = yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())
    config["available_node_types"]["head.cpu"]["no_such_field"] = 1
    with pytest.raises(jsonschema.ValidationError, match="no_such_field"):
        validate_config(config)


def _parses_as_cli(command: str) -> None:
    words = shlex.split(command)
    assert words[0] == "arcface", command
    build_parser().parse_args(words[1:])  # argparse exits (SystemExit) on anything it does not know


def test_kuberay_rayjob_has_what_kuberay_requires():
    job = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    _parses_as_cli(spec["entrypoint"])
    assert spec["entrypoint"].split()[1] == "train" and "--gpu" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    yaml.safe_load(spec["runtimeEnvYAML"])
    assert not SECRET_WORDS.search((INFRA / "k8s" / "rayjob.yaml").read_text())


def test_dask_cluster_manifest():
    dc = yaml.safe_load((INFRA / "k8s" / "dask-cluster.yaml").read_text())
    assert dc["apiVersion"] == "kubernetes.dask.org/v1" and dc["kind"] == "DaskCluster"
    worker = dc["spec"]["worker"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["dask", "worker"] and worker["image"]
    scheduler = dc["spec"]["scheduler"]
    assert scheduler["spec"]["containers"][0]["args"][:2] == ["dask", "scheduler"]
    assert scheduler["service"]["type"] == "ClusterIP"
    assert {p["port"] for p in scheduler["service"]["ports"]} >= {8786}


def test_mlflow_production_recipe():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    command = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in command and "--artifacts-destination s3://" in command
    assert "--serve-artifacts" in command
    assert "ports" not in services["mlflow"]  # only nginx (TLS + auth) is reachable from outside
    assert services["nginx"]["ports"] == ["443:443"]
    nginx = (INFRA / "mlflow" / "nginx.conf").read_text()
    assert "auth_basic_user_file" in nginx and "ssl_certificate" in nginx
    # Secrets come from .env (git-ignored), never from the files.
    for name in ("docker-compose.yaml", "nginx.conf", "env.example"):
        assert not SECRET_WORDS.search((INFRA / "mlflow" / name).read_text()), name
    assert "infra/mlflow/.env" in (ROOT / ".gitignore").read_text()


def test_dockerfile():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M), "runs unprivileged"
    assert "arcface fetch-weights" in text
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, re.M):
        assert not re.search(r"secret|password|token|access_key", line, re.I), line
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / src).exists(), f"COPY {src}: missing"


def test_runbook_commands_are_the_real_cli():
    text = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [line.split("#")[0].strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    arcface = [c for c in commands if c.startswith("arcface ")]
    assert len(arcface) >= 7
    for command in arcface:
        _parses_as_cli(command)
    # The rehearsal runs the same subcommands the runbook documents.
    script = (INFRA / "rehearsal" / "multinode.sh").read_text()
    used = set(re.findall(r"^\s*(?:RAY_ADDRESS=\S+ )?arcface ([a-z-]+)", script, re.M))
    documented = {c.split()[1] for c in arcface} | {"demo-data", "services"}
    assert used and used <= documented, used - documented


@pytest.mark.services
def test_multinode_rehearsal(tmp_path):
    work = tmp_path / "rehearsal"
    proc = subprocess.run([str(INFRA / "rehearsal" / "multinode.sh"), str(work)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Two training workers, two Ray nodes.
    placement = [json.loads(line) for line in (work / "runs" / "rehearsal" / "placement.jsonl").read_text().splitlines()]
    assert sorted(p["rank"] for p in placement) == [0, 1]
    assert len({p["node_id"] for p in placement}) == 2
    # Stage 1 ran on both Dask worker processes.
    manifest = json.loads((work / "stage1" / "manifest.json").read_text())
    assert len(set(manifest["executed_by"].values())) == 2
    # The registered model is the champion and leads back to the data it was trained on.
    lineage = json.loads((work / "lineage.json").read_text())
    assert "champion" in lineage["aliases"]
    assert lineage["dataset"]["content_hash"] == manifest["content_hash"]
    assert lineage["code_version"]


def test_the_rayjob_head_is_reachable_only_by_its_own_pods_submitter_and_operator():
    job = yaml.safe_load((INFRA / "k8s" / "rayjob.yaml").read_text())
    policy = yaml.safe_load((INFRA / "k8s" / "rayjob-networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    name = job["metadata"]["name"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head",
                                                             "ray.io/originated-from-cr-name": name}
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules), "no rule admits everyone"
    dashboard = [r for r in rules if any(p["port"] == 8265 for p in r.get("ports", []))]
    assert dashboard and all(r["ports"] == [{"port": 8265, "protocol": "TCP"}] for r in dashboard)
    sources = [peer["podSelector"]["matchLabels"] for r in rules for peer in r["from"]]
    assert {"batch.kubernetes.io/job-name": name} in sources
    assert "rayjob-networkpolicy.yaml" in (INFRA / "k8s" / "rayjob.yaml").read_text()

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


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for the patterns we use: a path is out when it, or a
    folder above it, matches a pattern (`**/` matches any depth, `*` within one name)."""
    import fnmatch

    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.strip().rstrip("/")
        if not pattern or pattern.startswith("#"):
            continue
        bare = pattern[3:] if pattern.startswith("**/") else None
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (bare and fnmatch.fnmatchcase(prefix.split("/")[-1], bare)):
                return True
    return False


def test_the_image_build_installs_the_wheel_and_runs_from_anywhere(tmp_path):
    """What `docker build` does, without a daemon: the wheel stage's `COPY . .` (honouring
    .dockerignore) -> `pip wheel` -> a non-editable install into an empty prefix; then every
    package of ours imports from that prefix (not from this checkout) and `arcface --help`
    runs from another folder. A package the wheel forgets (the image once lacked dataset/)
    fails here."""
    import os
    import shutil
    import sys

    text = (INFRA / "docker" / "Dockerfile").read_text()
    wheel_stage = text.split("FROM ", 2)[1]
    assert re.search(r"^COPY \. \.$", wheel_stage, re.M) and "pip wheel --no-deps" in wheel_stage
    assert re.search(r"^RUN pip install -c \S+ /tmp/wheels/\*\.whl", text, re.M), "the runtime installs the wheel"
    context = tmp_path / "context"
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        if not _dockerignored(rel, patterns) and (ROOT / rel).is_file():
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, context / rel)
    assert not (context / ".venv").exists() and not (context / "benchmarks" / "results").exists()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(context)], check=True, capture_output=True, timeout=300)
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target",
                    str(prefix), *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    packages = sorted(p.name for p in prefix.iterdir() if (p / "__init__.py").exists())
    assert packages == ["arcface_core", "cleaning", "dataset", "infra", "pipelines"], packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(prefix), PYTHONNOUSERSITE="1")
    importer = (
        "import importlib, pkgutil, sys\n"
        f"prefix = {str(prefix)!r}\n"
        f"for top in {packages!r}:\n"
        "    pkg = importlib.import_module(top)\n"
        "    assert pkg.__file__.startswith(prefix), pkg.__file__\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print('imported', len([m for m in sys.modules if m.split('.')[0] in " + repr(packages) + "]))\n")
    run = subprocess.run([sys.executable, "-c", importer], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    script = next((prefix / "bin").glob("arcface"))
    helped = subprocess.run([sys.executable, str(script), "--help"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "submit" in helped.stdout, helped.stderr[-2000:]


def _arcface_lines(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip().startswith("arcface ")]


def _shape(command: str) -> tuple[str, frozenset]:
    """`arcface submit train --data X --gpu` -> ("submit train", {--data, --gpu}), without the
    options whose values differ by site (--config/--set) or the rehearsal's small sizes."""
    words = shlex.split(command.replace("$", ""))
    verb = " ".join(words[1:3]) if words[1] == "submit" else words[1]
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    return verb, frozenset(flags - {"--config", "--set", "--max-steps", "--workers", "--gpu", "--min-delta"})


def test_runbook_commands_are_the_real_cli():
    text = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    runbook = [c for b in blocks for c in _arcface_lines(b)]
    assert len(runbook) >= 7
    for command in runbook:
        _parses_as_cli(command)
    # The rehearsal types the runbook's cluster commands, option for option.
    script = (INFRA / "rehearsal" / "shared_nothing.sh").read_text()
    rehearsed = [c for c in _arcface_lines(script) if c.split()[1] not in ("demo-data", "lineage")]
    documented = {_shape(c) for c in runbook}
    for command in rehearsed:
        verb, flags = _shape(command)
        assert any(v == verb and flags <= f for v, f in documented), f"not in infra/README.md: {command}"
    assert {"submit clean-data", "submit train", "submit evaluate", "promote", "copy"} <= {_shape(c)[0] for c in rehearsed}


@pytest.mark.services
def test_shared_nothing_rehearsal(tmp_path):
    """The runbook against a cluster that cannot see this checkout (shared_nothing.sh): the
    jobs run the cluster's wheel install, read the local config file's values by content,
    train across both Ray nodes, and the evaluated model is promoted."""
    import os

    if os.geteuid() != 0:
        pytest.skip("the rehearsal's mount namespaces need root (CI runs as root)")
    work = tmp_path / "rehearsal"
    proc = subprocess.run([str(INFRA / "rehearsal" / "shared_nothing.sh"), str(work)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for command in ("clean-data", "train", "evaluate"):
        assert re.search(rf"job arcface-{command}-\S+ succeeded", out), command
    # The cluster ran its own install: no path of this checkout in any job's entrypoint.
    entries = re.findall(r"Running entrypoint for job \S+: (.*)", out)
    assert len(entries) == 3 and all(e.startswith("arcface ") and str(ROOT) not in e for e in entries), entries
    lineage = json.loads((work / "lineage.json").read_text())
    assert "champion" in lineage["aliases"]
    # The local config file's values reached the job (it could not read the file).
    assert lineage["config"]["weight_decay"] == "0.000375" and lineage["config"]["name"] == "rehearsal"
    assert "+src." in lineage["code_version"], "the cluster's wheel reports its own version, not this checkout's"
    assert any(k.startswith("IJBC-") for k in lineage["evaluation"]), lineage["evaluation"]
    evidence = work / "evidence"
    placement = [json.loads(f.read_text()) for f in (evidence / "placement").glob("rank-*.json")]
    assert sorted(p["rank"] for p in placement) == [0, 1] and len({p["node_id"] for p in placement}) == 2
    stage1 = json.loads((evidence / "stage1-manifest.json").read_text())
    assert len(set(stage1["executed_by"].values())) == 2, "stage 1 ran on both Dask workers of the cluster"
    stage2 = json.loads((evidence / "stage2-manifest.json").read_text())
    assert lineage["dataset"]["content_hash"] == stage2["content_hash"]
    assert json.loads((evidence / "evaluation" / "evaluation.json").read_text())


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


def test_make_targets_run_the_cli_command_of_the_same_name():
    """`make clean-data` is `arcface clean-data` (the whole refinement), `make stage1` is
    `arcface stage1`; the older names still run the same commands."""
    makefile = (ROOT / "Makefile").read_text()
    for target in ("clean-data", "stage1"):
        recipe = re.search(rf"^{target}:.*\n\t(.*)$", makefile, re.M).group(1)
        assert recipe.split()[:2] == ["$(ARCFACE)", target], recipe
    parser = build_parser()
    for alias, name in (("refine", "clean-data"), ("stage2", "denoise")):
        args = ["--input", "raw", "--format", "vggface2", "--out", "out"] if name == "clean-data" else ["--data", "d", "--model", "m",
                                                                                 "--out", "o"]
        assert parser.parse_args([alias, *args]).func is parser.parse_args([name, *args]).func
    assert parser.parse_args(["clean-data", "--input", "raw", "--format", "vggface2", "--out", "o"]).func.__name__ == "cmd_clean_data"
    assert parser.parse_args(["stage1", "--input", "raw", "--format", "vggface2", "--out", "o"]).func.__name__ == "cmd_stage1"

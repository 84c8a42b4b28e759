#!/usr/bin/env bash
# The cluster runbook (infra/README.md, "Running on a cluster") as a user runs it, against a
# cluster that shares nothing with their machine but S3 and the service addresses. On one
# machine (root: CI runs as root):
#
#   the cluster   a Ray head + a second Ray node, a Dask scheduler + 2 workers, an MLflow server,
#                 run from an install of the project's WHEEL (non-editable) in their own
#                 environment, each in a mount namespace where this checkout (its venv, its
#                 configs) and the client's folder are empty tmpfs mounts: they do not exist
#   the client    this checkout's `arcface`, the demo raw data and a local --config file
#   shared        a local S3 endpoint (moto) and the services' addresses, nothing else
#
# The client: demo data -> `arcface copy` to S3 -> `arcface submit clean-data` (stage 1 on the
# cluster's Dask, bootstrap model and stage 2 on its Ray) -> `arcface submit train` with a
# local --config file (2 workers, one per node) -> `arcface submit evaluate` on the cluster's
# workers -> `arcface promote`.
#
# Usage: infra/rehearsal/shared_nothing.sh [WORKDIR]   (needs `make setup`; tests/test_infra.py
# runs it). Every process it starts is in its own process group and stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(realpath -m "${1:-$(mktemp -d)}")
CLIENT_VENV=${VENV:-$ROOT/.venv}
mkdir -p "$WORK"/{logs,wheel,client,cluster}
HOST=127.0.0.1
RAY_PORT=${RAY_PORT:-6391} RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8291}
DASK_PORT=${DASK_PORT:-8798} MLFLOW_PORT=${MLFLOW_PORT:-5091} S3_PORT=${S3_PORT:-9391}
BUCKET=rehearsal

say() { echo "== $*"; }
pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    [ -n "${CLUSTER_TMP:-}" ] && rm -rf "$CLUSTER_TMP"
    return 0
}
trap 'set +x; stop_all' EXIT
wait_for() {  # wait_for WHAT CMD...: retry CMD for up to 120 s
    local what=$1; shift
    for _ in $(seq 120); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
    echo "timed out waiting for $what" >&2; tail -n 30 "$WORK"/logs/*.log >&2; return 1
}

say "the cluster's environment: the project's wheel, installed (not editable) beside its dependencies"
"$CLIENT_VENV/bin/pip" wheel --quiet --no-deps --no-build-isolation -w "$WORK/wheel" "$ROOT" > "$WORK/logs/wheel.log" 2>&1
ENV="$WORK/cluster/env"
BASE_PYTHON=$("$CLIENT_VENV/bin/python" -c 'import sys; print(sys._base_executable)')
"$BASE_PYTHON" -m venv --without-pip "$ENV"
SITE=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CLIENT_SITE=$("$CLIENT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The dependencies are the client venv's files (the pinned versions an image gets from
# constraints.txt), hard-linked when the disk allows (seconds, no space); the project itself
# is not among them: its editable install is left out and the wheel installed instead.
cp -al "$CLIENT_SITE/." "$SITE/" 2>/dev/null || cp -a "$CLIENT_SITE/." "$SITE/"
rm -rf "$SITE"/__editable__*arcface* "$SITE"/arcface_pipeline-*.dist-info
"$ENV/bin/python" -m pip install --quiet --no-deps --no-index "$WORK"/wheel/arcface_pipeline-*.whl
export ARCFACE_CACHE="$WORK/cluster/cache"  # the image's own detector weights (its Dockerfile does this)
env -u VIRTUAL_ENV PATH="$ENV/bin:/usr/bin:/bin" "$ENV/bin/arcface" fetch-weights > "$WORK/logs/fetch-weights.log" 2>&1

say "S3 (the one thing both sides share), bucket $BUCKET"
S3="http://$HOST:$S3_PORT"
setsid "$CLIENT_VENV/bin/python" -m moto.server -H "$HOST" -p "$S3_PORT" > "$WORK/logs/s3.log" 2>&1 < /dev/null &
pids+=($!)
S3_ENV=(AWS_ENDPOINT_URL="$S3" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
        AWS_EC2_METADATA_DISABLED=true)
wait_for "S3" curl -sf "$S3/moto-api/"
env "${S3_ENV[@]}" "$CLIENT_VENV/bin/python" -c "
import boto3; boto3.client('s3', endpoint_url='$S3').create_bucket(Bucket='$BUCKET')"

# A cluster process: the cluster's environment, its own files, and none of the client's.
cluster() {  # cluster NAME CMD...
    local name=$1; shift
    setsid unshare --mount --propagation private -- /bin/sh -c \
        'mount -t tmpfs none "$1" && mount -t tmpfs none "$2" && shift 2 && cd "$HOME" && exec "$@"' \
        sh "$ROOT" "$WORK/client" \
        env -i HOME="$HOME" PATH="$ENV/bin:/usr/bin:/bin" LANG=C.UTF-8 ARCFACE_CACHE="$ARCFACE_CACHE" \
        ARCFACE_STATE_DIR="$WORK/cluster/state" TMPDIR="$CLUSTER_TMP" "${S3_ENV[@]}" \
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token \
        MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        "$@" > "$WORK/logs/$name.log" 2>&1 < /dev/null &
    pids+=($!)
}
mkdir -p "$WORK/cluster/state"
# The cluster's own temp folder and Ray session folder, short (Unix socket paths must stay
# under 107 bytes), so its processes never find a Ray of this machine's in /tmp/ray.
CLUSTER_TMP=$(mktemp -d /tmp/clusterXXXXXX)
RAY_TMP="$CLUSTER_TMP/ray"

say "the cluster: MLflow server, Dask scheduler + 2 workers, Ray head + a second node"
cluster mlflow python -m mlflow server --backend-store-uri "sqlite:///$WORK/cluster/mlflow.db" \
    --artifacts-destination "$WORK/cluster/mlflow-artifacts" --host "$HOST" --port "$MLFLOW_PORT" --workers 1
cluster dask-scheduler python -m distributed.cli.dask_scheduler --host "$HOST" --port "$DASK_PORT" \
    --dashboard-address "$HOST:0"
for n in 1 2; do
    cluster "dask-worker-$n" python -m distributed.cli.dask_worker "tcp://$HOST:$DASK_PORT" --host "$HOST" \
        --nanny-port 0 --dashboard-address "$HOST:0" --nworkers 1 --nthreads 1 --name "w$n" --memory-limit 4GiB
done
# A multi-node Ray cluster binds its listeners to every interface (nodes must reach each
# other), so token authentication is on; its token is the one credential the user is given.
RAY="python -m ray.scripts.scripts"
env -u VIRTUAL_ENV PATH="$ENV/bin:/usr/bin:/bin" RAY_AUTH_MODE=token "$ENV/bin/python" -m ray.scripts.scripts \
    get-auth-token --generate > /dev/null
cluster ray-head $RAY start --head --block --node-ip-address="$HOST" --port="$RAY_PORT" --num-cpus=1 \
    --temp-dir="$RAY_TMP" \
    --dashboard-host="$HOST" --dashboard-port="$RAY_DASHBOARD_PORT" --object-store-memory=200000000 \
    --dashboard-agent-listen-port=52480 --metrics-export-port=52481 --runtime-env-agent-port=52482 \
    --dashboard-agent-grpc-port=52483 --disable-usage-stats
wait_for "the Ray head" curl -sf -o /dev/null -w '%{http_code}' "http://$HOST:$RAY_DASHBOARD_PORT/" 
cluster ray-node-2 $RAY start --block --address="$HOST:$RAY_PORT" --node-ip-address="$HOST" --num-cpus=1 \
    --temp-dir="$RAY_TMP" \
    --object-store-memory=200000000 --dashboard-agent-listen-port=52490 --metrics-export-port=52491 \
    --runtime-env-agent-port=52492 --dashboard-agent-grpc-port=52493 --disable-usage-stats
wait_for "MLflow" curl -sf "http://$HOST:$MLFLOW_PORT/health"
wait_for "2 Dask workers" "$CLIENT_VENV/bin/python" -c "
from distributed import Client; import sys
with Client('tcp://$HOST:$DASK_PORT', timeout=5) as c: sys.exit(len(c.scheduler_info()['workers']) != 2)"
wait_for "2 Ray nodes" env RAY_AUTH_MODE=token "$CLIENT_VENV/bin/python" -c "
import ray, sys; ray.init(address='$HOST:$RAY_PORT', logging_level='ERROR')
sys.exit(sum(n['Alive'] for n in ray.nodes()) != 2)"

say "the client: this checkout's arcface, pointed at the cluster by addresses alone"
export PATH="$CLIENT_VENV/bin:$PATH" RAY_AUTH_MODE=token
export RAY_ADDRESS="http://$HOST:$RAY_DASHBOARD_PORT" MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"
export "${S3_ENV[@]}" ARCFACE_STATE_DIR="$WORK/client/state"
unset ARCFACE_CACHE
cd "$WORK/client"
# A local recipe file: its values must reach the jobs (they cannot read this file).
sed '/^\[train\]$/a name = "rehearsal"\nregistered_model = "rehearsal-arcface"\nweight_decay = 0.000375' \
    "$ROOT/configs/demo-train.toml" > train.toml

set -x
arcface demo-data --out raw --identities 16 --images-per-identity 10 --workers 2 --set demo.ijb_subjects=8 > /dev/null
arcface copy raw "s3://$BUCKET/raw"
arcface submit clean-data --input "s3://$BUCKET/raw" --format vggface2 --out "s3://$BUCKET/refined" \
    --scheduler "tcp://$HOST:$DASK_PORT" --config train.toml --set clean.records_per_partition=40 \
    --set denoise.workers=2
arcface submit train --data "s3://$BUCKET/refined/stage2" --config train.toml --workers 2 --max-steps 12 \
    --storage "s3://$BUCKET/runs" --set train.checkpoint_every=12 --set train.eval_every=12
arcface submit evaluate --model models:/rehearsal-arcface/1 --data "s3://$BUCKET/refined/stage2" \
    --ijb "s3://$BUCKET/raw/ijb/IJBC" --out "s3://$BUCKET/evaluation" --workers 2
arcface promote --name rehearsal-arcface --version latest
arcface lineage --name rehearsal-arcface --version champion > "$WORK/lineage.json"
# Evidence for tests/test_infra.py, read back from S3 before the endpoint goes.
arcface copy "s3://$BUCKET/runs/rehearsal/placement" "$WORK/evidence/placement"
arcface copy "s3://$BUCKET/refined/stage1/manifest.json" "$WORK/evidence/stage1-manifest.json"
arcface copy "s3://$BUCKET/refined/stage2/manifest.json" "$WORK/evidence/stage2-manifest.json"
arcface copy "s3://$BUCKET/evaluation" "$WORK/evidence/evaluation"
set +x
echo "rehearsal done: $WORK"

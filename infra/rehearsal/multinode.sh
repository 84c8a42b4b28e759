#!/usr/bin/env bash
# Multi-node rehearsal on one machine: the runbook (infra/README.md) against 127.0.0.1.
#
#   a Dask scheduler + 2 separate worker processes   -> stage 1 of the demo data
#   a Ray head + a second Ray node (1 CPU each)      -> a 2-worker training job, one worker per node
#   an MLflow server                                  -> the run tracked, its model registered and promoted
#
# Usage: infra/rehearsal/multinode.sh [WORKDIR]   (tests/test_infra.py runs it; needs `make setup`)
# Every process it starts is in its own process group and is stopped on exit; nothing else
# on the machine is touched (no `ray stop`).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=$(realpath -m "${1:-$(mktemp -d)}")
mkdir -p "$WORK/logs"
BIN=${VENV:-$PWD/.venv}/bin
export PATH="$BIN:$PATH"
HOST=127.0.0.1
RAY_PORT=${RAY_PORT:-6390} RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8290}
DASK_PORT=${DASK_PORT:-8799} MLFLOW_PORT=${MLFLOW_PORT:-5090}
# A multi-node Ray cluster binds its listeners to every interface (nodes must reach each
# other); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps a single-node head on 127.0.0.1,
# refuses a second node. So the rehearsal's two Ray nodes listen on all interfaces while it
# runs (token authentication on); run it where a firewall closes them, as CI's sandbox does.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true ARCFACE_STATE_DIR="$WORK/state"

pids=()
start() {  # start NAME CMD...: in the background, own process group, log in $WORK/logs
    local name=$1; shift
    setsid "$@" > "$WORK/logs/$name.log" 2>&1 < /dev/null &
    pids+=($!)
}
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 2
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    arcface services down > /dev/null 2>&1 || true
}
trap stop_all EXIT
wait_for() {  # wait_for WHAT CMD...: retry CMD for up to 90 s
    local what=$1; shift
    for _ in $(seq 90); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
    echo "timed out waiting for $what" >&2; tail -n 30 "$WORK"/logs/*.log >&2; return 1
}

echo "== demo raw data"
arcface demo-data --out "$WORK/raw" --identities 16 --images-per-identity 10 --workers 2 > /dev/null

echo "== Dask: scheduler + 2 worker processes; stage 1 on them"
start dask-scheduler dask scheduler --host "$HOST" --port "$DASK_PORT" --dashboard-address "$HOST:0"
for n in 1 2; do
    start "dask-worker-$n" dask worker "tcp://$HOST:$DASK_PORT" --host "$HOST" --nanny-port 0 \
        --dashboard-address "$HOST:0" --nworkers 1 --nthreads 1 --name "w$n" --memory-limit 4GiB
done
wait_for "2 Dask workers" python -c "
from distributed import Client; import sys
with Client('tcp://$HOST:$DASK_PORT', timeout=5) as c: sys.exit(len(c.scheduler_info()['workers']) != 2)"
arcface clean-data --input "$WORK/raw" --format vggface2 --out "$WORK/stage1" \
    --scheduler "tcp://$HOST:$DASK_PORT" --set clean.records_per_partition=40

echo "== Ray: head + a second node; MLflow server"
ray get-auth-token --generate > /dev/null
start ray-head ray start --head --block --node-ip-address="$HOST" --port="$RAY_PORT" --num-cpus=1 \
    --dashboard-host="$HOST" --dashboard-port="$RAY_DASHBOARD_PORT" --object-store-memory=200000000 \
    --dashboard-agent-listen-port=52380 --metrics-export-port=52381 --runtime-env-agent-port=52382 \
    --dashboard-agent-grpc-port=52383 --disable-usage-stats
wait_for "the Ray head" ray status --address="$HOST:$RAY_PORT"
start ray-node-2 ray start --block --address="$HOST:$RAY_PORT" --node-ip-address="$HOST" --num-cpus=1 \
    --object-store-memory=200000000 --dashboard-agent-listen-port=52390 --metrics-export-port=52391 \
    --runtime-env-agent-port=52392 --dashboard-agent-grpc-port=52393 --disable-usage-stats
wait_for "2 Ray nodes" python -c "
import ray, sys; ray.init(address='$HOST:$RAY_PORT', logging_level='ERROR')
sys.exit(sum(n['Alive'] for n in ray.nodes()) != 2)"
# The dashboard takes jobs once a node's job agent is up: a no-op job says when.
wait_for "the job agent" ray job submit --address "http://$HOST:$RAY_DASHBOARD_PORT" --no-wait -- echo ready
arcface services up --only mlflow --set services.mlflow_port="$MLFLOW_PORT" > /dev/null
export MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT"

echo "== training: ray job submit, 2 workers"
RAY_ADDRESS="http://$HOST:$RAY_DASHBOARD_PORT" arcface submit-train --data "$WORK/stage1" \
    --config configs/demo-train.toml --workers 2 --max-steps 12 --storage "$WORK/runs" --name rehearsal \
    --set train.checkpoint_every=12 --set services.ray_dashboard_port="$RAY_DASHBOARD_PORT"

echo "== registry: promote the new version, show its lineage"
arcface promote --name arcface --version latest
arcface lineage --name arcface --version champion > "$WORK/lineage.json"
echo "rehearsal done: $WORK"

#!/usr/bin/env bash
# Stage 1 to S3 and training from S3 with checkpoints on S3, all on the local services:
# a moto S3 endpoint (with the bucket `arcface`), a Ray head and an MLflow server.
# The README shows these lines; tests/test_fail_fast.py runs this file as it is.
set -euo pipefail
INPUT=${INPUT:-data/demo/raw}          # `make demo-data` writes it
arcface services up --s3               # Ray head, MLflow server, S3 endpoint + bucket `arcface`
eval "$(arcface services env --s3)"    # RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_* of the local endpoint
arcface stage1 --input "$INPUT" --format vggface2 --out s3://arcface/demo/stage1
arcface submit train --data s3://arcface/demo/stage1 --storage s3://arcface/runs --name s3-demo \
    --config configs/demo-train.toml --max-steps 20

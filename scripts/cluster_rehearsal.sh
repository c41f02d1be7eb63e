#!/usr/bin/env bash
# docs/CLUSTER.md's walk-through on one machine, with stand-ins for the cloud: a loopback S3-API server
# (`python -m amldist.loopback_s3`) as the bucket and `ray start --head` as the cluster `ray up` would
# make. Every other command is the one the walk-through gives. Run from the repository root with the
# venv's bin first on PATH:
#
#     PATH=$PWD/.venv/bin:$PATH bash scripts/cluster_rehearsal.sh [OUT_DIR]
#
# It leaves data/synth-tiny (reused when present) and writes each step's output to OUT_DIR
# (default runs/cluster-rehearsal). It stops exactly what it started: the S3 server by its pid, the
# Ray head by the processes that name its own temp folder (other Ray clusters on the machine are left
# alone; plain `ray stop` would end them too).
set -euo pipefail

OUT=${1:-runs/cluster-rehearsal}
mkdir -p "$OUT"
free_port() { python -c "from amldist.loopback_s3 import free_port; print(free_port())"; }
S3_PORT=$(free_port); GCS_PORT=$(free_port); DASH_PORT=$(free_port); AGENT_PORT=$(free_port)
RAY_TEMP=$(mktemp -d /tmp/amlrehearsal.XXXXXX)   # short: Ray's socket paths live below it
ENDPOINT=http://127.0.0.1:$S3_PORT
CREDENTIALS=(AWS_ACCESS_KEY_ID=amldist-test AWS_SECRET_ACCESS_KEY=amldist-test AWS_REGION=us-east-1)

step() { echo "\$ $*" | tee -a "$OUT/steps.txt"; "$@" 2>&1 | tee -a "$OUT/steps.txt"; }

cleanup() {
    [ -n "${S3_PID:-}" ] && kill "$S3_PID" 2>/dev/null || true
    pids=$(pgrep -f "$RAY_TEMP" || true)
    [ -n "$pids" ] && kill $pids 2>/dev/null && sleep 5
    pids=$(pgrep -f "$RAY_TEMP" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    rm -rf "$RAY_TEMP"
}
trap cleanup EXIT

: > "$OUT/steps.txt"
python -m amldist.loopback_s3 --port "$S3_PORT" --bucket amldist-data --bucket amldist-runs > "$OUT/s3.txt" 2>&1 &
S3_PID=$!
sleep 3

# 1. Data: synthesise, shard, upload (a real dataset: `amldist data download`, then the same two steps).
[ -f data/synth-tiny/synth.json ] || step amldist data synth --root data/synth-tiny --preset tiny
step amldist data shards --root data/synth-tiny --dataset retrieval-SfM-120k --image-size 128 --splits train,val
# Only what training reads: the split pkl and the shards (asym runs: features/ too), not the images.
PKL=train/retrieval-SfM-120k/retrieval-SfM-120k.pkl
step env AWS_ENDPOINT_URL=$ENDPOINT "${CREDENTIALS[@]}" amldist data upload data/synth-tiny/$PKL s3://amldist-data/synth-tiny/$PKL
step env AWS_ENDPOINT_URL=$ENDPOINT "${CREDENTIALS[@]}" amldist data upload data/synth-tiny/shards s3://amldist-data/synth-tiny/shards

# 2. The cluster (stand-in for `ray up cluster/ray_cluster.yaml`): no AWS variables in its environment,
#    so the job below reaches the bucket only through its runtime env.
step env RAY_TMPDIR="$RAY_TEMP" RAY_AUTH_MODE=disabled ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus 2 --num-gpus 0 --temp-dir "$RAY_TEMP" \
    --dashboard-agent-listen-port "$AGENT_PORT" --disable-usage-stats
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
# `ray start` returns before the dashboard agent listens; the job server needs it to take a submission.
until python -c "import socket; socket.create_connection(('127.0.0.1', $AGENT_PORT), 1)" 2>/dev/null; do sleep 1; done

# 3. The job: the local command, submitted; data and checkpoints in the bucket.
ENV_JSON="{\"env_vars\": {\"AWS_ENDPOINT_URL\": \"$ENDPOINT\", \"AWS_ACCESS_KEY_ID\": \"amldist-test\", \"AWS_SECRET_ACCESS_KEY\": \"amldist-test\", \"AWS_REGION\": \"us-east-1\", \"WANDB_MODE\": \"offline\", \"AMLDIST_CACHE\": \"$PWD/$OUT/node-cache\"}}"
step ray job submit --submission-id amldist-rehearsal --working-dir . --runtime-env-json "$ENV_JSON" --no-wait -- \
    amldist train --config presets/tiny-student-contr-sym.yaml --set data.root=s3://amldist-data/synth-tiny \
    --storage s3://amldist-runs/runs --set run.epochs=2 --set run.out_dir="$PWD/$OUT/rank0" --name cluster-demo
until ray job status amldist-rehearsal 2>&1 | grep -qiE "succeeded|failed|stopped"; do sleep 5; done
step ray job status amldist-rehearsal
step ray job logs amldist-rehearsal
step ray job list

# 4. What the run left: checkpoints in the bucket, rank 0's files (metrics, best model, wandb) on its node.
step env AWS_ENDPOINT_URL=$ENDPOINT "${CREDENTIALS[@]}" python -c \
    "from amldist import storage; [print(f'{size:>10}  {name}') for name, size in sorted(storage.list_files('s3://amldist-runs/runs/cluster-demo').items())]"
step find "$OUT/rank0/cluster-demo" -maxdepth 3 -not -path "*/files/*" -not -path "*/logs/*"

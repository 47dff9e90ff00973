#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Start (or restart) the MLflow tracking server on a Ray head node, in the background.
# cluster.yaml and deploy/cluster-gcp.yaml run it from head_start_ray_commands, after `ray start --head`.
#
#   start-mlflow.sh ARTIFACTS_DESTINATION [BACKEND_STORE_URI]
#
#   ARTIFACTS_DESTINATION  where the server stores artifacts: s3://BUCKET/mlflow, gs://BUCKET/mlflow or a folder.
#                          The server proxies artifact I/O (--serve-artifacts): clients need no bucket credentials.
#   BACKEND_STORE_URI      runs, params and metrics; default sqlite:///$MLFLOW_HOME/mlflow.db on the head's disk.
#                          postgresql://USER:PASSWORD@HOST:5432/mlflow for a managed database (pip install psycopg2-binary).
#
# Environment: MLFLOW_HOST (default: this node's private IP as Ray sees it, so trials and drivers on any node
# reach it; never 0.0.0.0), MLFLOW_PORT (5000), MLFLOW_HOME (~/mlflow: database, log, pid file, tracking_uri),
# MLFLOW_APP_NAME (basic-auth for MLflow's username/password login; needs `pip install mlflow[auth]` and
# MLFLOW_FLASK_SERVER_SECRET_KEY), MLFLOW_ALLOWED_HOSTS (Host headers to accept; default: the bind address
# and 127.0.0.1/localhost on any port, i.e. http://<private ip>:5000 and ssh tunnels, nothing else).
#
# The server runs in a session of its own; a rerun (every `ray up`) stops the previous one through its
# process group, recorded in $MLFLOW_HOME/server.pid. The tracking URI is written to $MLFLOW_HOME/tracking_uri.
set -euo pipefail

dest=${1:?usage: start-mlflow.sh ARTIFACTS_DESTINATION [BACKEND_STORE_URI]}
home=${MLFLOW_HOME:-$HOME/mlflow}
backend=${2:-sqlite:///$home/mlflow.db}
port=${MLFLOW_PORT:-5000}
host=${MLFLOW_HOST:-$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')}

case "$host" in
  "" | 0.0.0.0 | :: | "[::]")
    echo "start-mlflow.sh: refusing to bind MLflow to '$host' (every interface); give the node's private IP" >&2
    exit 2 ;;
esac

mkdir -p "$home"
pidfile=$home/server.pid
old=$(cat "$pidfile" 2>/dev/null || true)
# Only a group led by our own `mlflow server`: after a container restart the pid may belong to another process.
if [ -n "$old" ] && tr '\0' ' ' 2>/dev/null <"/proc/$old/cmdline" | grep -q "mlflow server --host"; then
  # The whole process group: `mlflow server` runs its web workers as child processes.
  kill -TERM -- "-$old" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 -- "-$old" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$old" 2>/dev/null || true
fi
rm -f "$pidfile"

args=(server --host "$host" --port "$port" --backend-store-uri "$backend"
      --artifacts-destination "$dest" --serve-artifacts)
# Host headers the server answers: its own address, and 127.0.0.1/localhost for ssh tunnels (any local port).
# Explicit, because MLflow's default (localhost and RFC 1918 addresses) misses VPCs on other private ranges.
args+=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$host:$port,127.0.0.1:*,localhost:*}")
if [ -n "${MLFLOW_APP_NAME:-}" ]; then args+=(--app-name "$MLFLOW_APP_NAME"); fi

# setsid: a new session whose id is the pid written below, so the next run can stop the whole group.
echo "$(date -u +%FT%TZ) mlflow ${args[*]}" >>"$home/server.log"
setsid bash -c 'echo $$ >"$0"; exec nohup mlflow "$@"' "$pidfile" "${args[@]}" >>"$home/server.log" 2>&1 </dev/null &

uri="http://$host:$port"
echo "$uri" >"$home/tracking_uri"
# A cold start takes tens of seconds (database migrations): poll /health rather than sleep.
for _ in $(seq 180); do
  if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$uri/health" 2>/dev/null; then
    echo "MLflow tracking server at $uri (log: $home/server.log)"
    exit 0
  fi
  if [ -s "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "start-mlflow.sh: the MLflow server exited; the end of $home/server.log:" >&2
    tail -n 30 "$home/server.log" >&2
    exit 1
  fi
  sleep 1
done
echo "start-mlflow.sh: no answer from $uri/health after 180 s; see $home/server.log" >&2
exit 1

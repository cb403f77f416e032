#!/usr/bin/env bash
# Starts a local clip-ray cluster: an MLflow tracking server and a Ray head (dashboard
# and jobs API on 127.0.0.1), plus optional extra Ray worker nodes on this machine.
#
#   infra/local/start.sh [--workers N] [--worker-cpus C] [--no-mlflow] [--no-ray]
#
# Settings are environment variables (see lib.sh); the state dir (.clip-ray/) keeps
# pid files, logs, the Ray token and MLflow's data. Afterwards `source .clip-ray/env.sh`
# gives a shell everything `ray job submit` and MLflow clients need.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

num_workers=0
with_mlflow=1
with_ray=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) num_workers="$2"; shift 2 ;;
        --worker-cpus) WORKER_CPUS="$2"; shift 2 ;;
        --no-mlflow) with_mlflow=0; shift ;;
        --no-ray) with_ray=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$num_workers" =~ ^[0-9]+$ ]] || die "--workers takes a number, not '$num_workers'"
[[ "$AUTH_MODE" == token || "$AUTH_MODE" == disabled ]] ||
    die "CLIP_RAY_AUTH_MODE must be 'token' or 'disabled', not '$AUTH_MODE'"
((with_ray || !num_workers)) || die "--workers needs the Ray head (drop --no-ray)"
require_tools

for service in ray-head mlflow; do
    if pid="$(service_pid "$service")"; then
        die "$service already runs from $STATE_DIR (pid $pid): infra/local/status.sh shows it, infra/local/stop.sh stops it"
    fi
done
ports=()
((with_ray)) && ports+=("$HEAD_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT")
((with_mlflow)) && ports+=("$MLFLOW_PORT")
for port in "${ports[@]}"; do
    if port_in_use "$port"; then
        die "port $port is taken (another Ray or MLflow?): choose others with CLIP_RAY_*_PORT, see infra/README.md"
    fi
done

rm -rf "$PID_DIR"
mkdir -p "$PID_DIR" "$LOG_DIR"
rm -f "$STATE_DIR/ray-temp-dir" "$STATE_DIR/ray-address"
temp_dir="$(ray_temp_dir)"
# status, stop and add-worker read these back: they talk to what runs, not to their own defaults.
cat >"$STATE_DIR/settings" <<EOF
HEAD_PORT=$HEAD_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
CLIENT_PORT=$CLIENT_PORT
MLFLOW_PORT=$MLFLOW_PORT
OBJECT_STORE_MB=$OBJECT_STORE_MB
WORKER_CPUS=$WORKER_CPUS
AUTH_MODE=$AUTH_MODE
WITH_MLFLOW=$with_mlflow
WITH_RAY=$with_ray
EOF

started_ok=0
stop_on_failure() {
    if ((!started_ok)); then
        log "start failed: stopping what it started (logs stay in $LOG_DIR)"
        "$LOCAL_DIR/stop.sh" >&2 || true
    fi
}
trap stop_on_failure EXIT

if ((with_mlflow)); then
    # SQLite for runs; artifacts go through the server (mlflow-artifacts:/) into the
    # state dir, so clients need no access to the disk. The GenAI job runner is off:
    # clip-ray does not use it and it costs a dozen processes.
    mkdir -p "$MLFLOW_DIR/artifacts"
    spawn mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        "$MLFLOW" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
        --artifacts-destination "$MLFLOW_DIR/artifacts"
fi

if ((with_ray)); then
    if [[ "$AUTH_MODE" == token && ! -s "$TOKEN_FILE" ]]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN_FILE")
        log "generated a Ray auth token in $TOKEN_FILE"
    fi
    printf '%s\n' "$temp_dir" >"$STATE_DIR/ray-temp-dir"
    rm -f "$temp_dir/ray_current_cluster"  # a previous run's address must not pass for this one's
    head_args=(--head --block --port "$HEAD_PORT"
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
        --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$(free_port)"
        --temp-dir "$temp_dir" --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024))
        --disable-usage-stats)
    [[ -n "${CLIP_RAY_HEAD_CPUS:-}" ]] && head_args+=(--num-cpus "$CLIP_RAY_HEAD_CPUS")
    # --block keeps `ray start` alive as the node's supervisor: SIGTERM to it shuts the node down.
    ray_node_env "$with_mlflow" ray-head
    spawn ray-head "${RAY_NODE_ENV[@]}" "$RAY" start "${head_args[@]}"
fi

if ((with_mlflow)); then
    wait_for "MLflow server" mlflow mlflow_healthy
fi
if ((with_ray)); then
    wait_for "Ray head" ray-head test -s "$temp_dir/ray_current_cluster"
    cp "$temp_dir/ray_current_cluster" "$STATE_DIR/ray-address"
    wait_for "Ray dashboard and jobs API" ray-head dashboard_get /api/version
    wait_for "Ray head node" ray-head node_count_is 1
    for ((i = 0; i < num_workers; i++)); do
        "$LOCAL_DIR/add-worker.sh"
    done
fi

write_env_file
started_ok=1
"$LOCAL_DIR/status.sh"

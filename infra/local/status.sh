#!/usr/bin/env bash
# Says what runs where: the Ray head (address, dashboard, auth, nodes), extra
# workers, MLflow (URL and health), and how a shell connects to them.
# Exit status: 0 all up, 1 something recorded is down or unhealthy, 3 nothing started.
#
#   infra/local/status.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if ! load_running_settings; then
    echo "nothing started from $STATE_DIR (infra/local/start.sh starts it)"
    exit 3
fi
problems=0
down() { echo "  $1: NOT RUNNING (log: $LOG_DIR/$2.log)"; problems=$((problems + 1)); }

echo "clip-ray local cluster, state in $STATE_DIR"
if ((WITH_RAY)); then
    if pid="$(service_pid ray-head)"; then
        echo "Ray head: running (pid $pid)"
        echo "  address:   $(cat "$STATE_DIR/ray-address" 2>/dev/null || echo '?')"
        echo "  dashboard: $DASHBOARD_URL (also the jobs API)"
        if [[ "$AUTH_MODE" == token ]]; then
            echo "  auth:      token (RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE)"
        else
            echo "  auth:      disabled (RAY_AUTH_MODE=disabled): anyone who reaches the ports runs code"
        fi
        echo "  logs:      $(ray_temp_dir)/session_latest/logs"
        if nodes="$(dashboard_get '/api/v0/nodes?limit=1000' 2>/dev/null)"; then
            "$PYTHON" -c '
import json, sys
nodes = json.loads(sys.argv[1])["data"]["result"]["result"]
alive = [node for node in nodes if node["state"] == "ALIVE"]
print("  nodes:     %d alive" % len(alive))
for node in sorted(alive, key=lambda node: not node["is_head_node"]):
    total = node.get("resources_total", {})
    gpus = ", %g GPU" % total["GPU"] if total.get("GPU") else ""
    kind = "head  " if node["is_head_node"] else "worker"
    roles = "".join(", %s %g" % (role, total[role]) for role in ("trainer", "data") if total.get(role))
    print("    %s %s  %g CPU%s%s  %s" % (kind, node["node_ip"], total.get("CPU", 0), gpus, roles,
                                       node["node_id"][:12]))
' "$nodes"
        else
            echo "  nodes:     the dashboard does not answer"
            problems=$((problems + 1))
        fi
    else
        down "Ray head" ray-head
    fi
    for file in "$PID_DIR"/ray-worker-*.pid; do
        [[ -e "$file" ]] || continue
        name="$(basename "$file" .pid)"
        if pid="$(service_pid "$name")"; then
            node_id="$(cat "$PID_DIR/$name.node-id" 2>/dev/null || echo '?')"
            echo "Ray worker ${name#ray-worker-}: running (pid $pid, node ${node_id:0:12}, temp dir $(ray_temp_dir)-w${name#ray-worker-})"
        else
            down "Ray worker ${name#ray-worker-}" "$name"
        fi
    done
fi
if ((WITH_MLFLOW)); then
    if pid="$(service_pid mlflow)"; then
        if mlflow_healthy; then health=OK; else health="NOT ANSWERING"; problems=$((problems + 1)); fi
        echo "MLflow: running (pid $pid) at $MLFLOW_URL, health: $health"
        echo "  store:     sqlite:///$MLFLOW_DIR/mlflow.db, artifacts in $MLFLOW_DIR/artifacts (served by the server)"
    else
        down MLflow mlflow
    fi
fi
echo
echo "In a shell:  source $ENV_FILE"
if ((WITH_RAY)); then
    echo "then:        ray job submit --working-dir . -- python jobs/train.py"
    echo "             ray job logs -f <job id>;  ray job stop <job id>;  ray status"
fi
exit $((problems > 0))

#!/usr/bin/env bash
# Stops everything start.sh and add-worker.sh started from this state dir, and
# nothing else: the Ray nodes, MLflow, and any process they left behind (job
# entrypoints, Ray workers), found by the CLIP_RAY_INSTANCE marker. Logs, the token
# and MLflow's data stay. Exits non-zero if a process survives.
#
#   infra/local/stop.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

services=()
pids=()
for file in "$PID_DIR"/*.pid; do
    [[ -e "$file" ]] || continue
    name="$(basename "$file" .pid)"
    if pid="$(service_pid "$name")"; then
        services+=("$name")
        pids+=("$pid")
    fi
done
if ((${#pids[@]})); then
    log "stopping ${services[*]}"
    # A `ray start --block` process shuts its node down on SIGTERM (Ray's own cleanup).
    terminate 30 "${pids[@]}"
fi

read -r -a leftovers <<<"$(instance_pids | tr '\n' ' ')"
if ((${#leftovers[@]})); then
    log "stopping ${#leftovers[@]} leftover process(es): ${leftovers[*]}"
    terminate 10 "${leftovers[@]}"
fi

rm -rf "$PID_DIR"
rm -f "$ENV_FILE" "$STATE_DIR/settings" "$STATE_DIR/ray-address" "$STATE_DIR/ray-temp-dir"

read -r -a survivors <<<"$(instance_pids | tr '\n' ' ')"
if ((${#survivors[@]})); then
    die "still running: ${survivors[*]}"
fi
log "stopped; nothing of $STATE_DIR runs any more"

#!/usr/bin/env bash
# Adds one Ray worker node on this machine to the head that start.sh started.
#
#   infra/local/add-worker.sh [--num-cpus C] [--role trainer|data] [--slots K]
#
# Each worker has its own temp dir (<head temp dir>-wN) and its own agent port, so
# several share one machine; they are how a laptop rehearses a multi-node cluster
# (scheduling across nodes, storage that must be shared, a node that goes away).
# Roles are Ray resources, as on Kubernetes and the clouds: a trainer node advertises
# "trainer" K (the training workers it hosts, for cluster.worker_resources: {trainer: 1}),
# a data node advertises "data" 1 and no "trainer", so it only ever preprocesses.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_running_settings || die "no cluster recorded in $STATE_DIR: run infra/local/start.sh first"
num_cpus="$WORKER_CPUS"
role=""
slots=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --num-cpus) num_cpus="$2"; shift 2 ;;
        --role) role="$2"; shift 2 ;;
        --slots) slots="$2"; shift 2 ;;
        -h | --help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
case "$role" in
    "") resources="{}" ;;
    trainer) [[ "$slots" =~ ^[1-9][0-9]*$ ]] || die "--slots takes a positive number, not '$slots'"
             resources="{\"trainer\": $slots}" ;;
    data) resources='{"data": 1}' ;;
    *) die "--role is 'trainer' or 'data', not '$role'" ;;
esac
require_tools
service_pid ray-head >/dev/null || die "the Ray head of $STATE_DIR is not running"

# A number is never reused while the cluster runs: a lost node's temp dir and logs stay its own.
n=1
while [[ -e "$(pid_file "ray-worker-$n")" ]]; do n=$((n + 1)); done
name="ray-worker-$n"
# Half the head's object store, but not under Ray's minimum (75 MiB).
worker_store_mb=$((OBJECT_STORE_MB / 2 > 100 ? OBJECT_STORE_MB / 2 : 100))

ray_node_env "$WITH_MLFLOW" "$name"
spawn "$name" "${RAY_NODE_ENV[@]}" "$RAY" start --block \
    --address "$(cat "$STATE_DIR/ray-address")" \
    --temp-dir "$(ray_temp_dir)-w$n" --num-cpus "$num_cpus" --resources "$resources" \
    --object-store-memory $((worker_store_mb * 1024 * 1024)) \
    --dashboard-agent-listen-port "$(free_port)" --disable-usage-stats
wait_for "Ray worker $n" "$name" worker_is_alive "$n"
node_id="$(worker_node_id "$n")"
printf '%s\n' "$node_id" >"$PID_DIR/$name.node-id"
log "worker $n joined with $num_cpus CPU(s)${role:+ as a $role node} (pid $(cat "$(pid_file "$name")"), node ${node_id:0:12})"

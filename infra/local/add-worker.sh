#!/usr/bin/env bash
# Adds one Ray worker node on this machine to the head that start.sh started.
#
#   infra/local/add-worker.sh [--num-cpus C]
#
# Each worker has its own temp dir (<head temp dir>-wN) and its own agent port, so
# several share one machine; they are how a laptop rehearses a multi-node cluster
# (scheduling across nodes, storage that must be shared, a node that goes away).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_running_settings || die "no cluster recorded in $STATE_DIR: run infra/local/start.sh first"
num_cpus="$WORKER_CPUS"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --num-cpus) num_cpus="$2"; shift 2 ;;
        -h | --help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
require_tools
service_pid ray-head >/dev/null || die "the Ray head of $STATE_DIR is not running"

n=1
while service_pid "ray-worker-$n" >/dev/null; do n=$((n + 1)); done
name="ray-worker-$n"
nodes_before="$(alive_node_count)"
# Half the head's object store, but not under Ray's minimum (75 MiB).
worker_store_mb=$((OBJECT_STORE_MB / 2 > 100 ? OBJECT_STORE_MB / 2 : 100))

ray_node_env "$WITH_MLFLOW"
spawn "$name" "${RAY_NODE_ENV[@]}" "$RAY" start --block \
    --address "$(cat "$STATE_DIR/ray-address")" \
    --temp-dir "$(ray_temp_dir)-w$n" --num-cpus "$num_cpus" \
    --object-store-memory $((worker_store_mb * 1024 * 1024)) \
    --dashboard-agent-listen-port "$(free_port)" --disable-usage-stats
wait_for "Ray worker $n" "$name" node_count_is $((nodes_before + 1))
log "worker $n joined with $num_cpus CPU(s) (pid $(cat "$(pid_file "$name")"))"

#!/usr/bin/env bash
# Pulls the plug on one worker node that add-worker.sh started: SIGKILL to its `ray start`,
# its raylet, its agents and every Ray worker process on it, all at once, as when a machine
# dies. Nothing of the node gets to say goodbye; the head finds out by its health checks.
#
#   infra/local/kill-worker.sh N        (N as in status.sh: "Ray worker N", temp dir <temp>-wN)
#
# The node's pid file stays, so status.sh reports it as not running; add-worker.sh adds a
# new node under the next free number. The head has no such script: without GCS fault
# tolerance its loss ends the cluster (see "What happens when a node is lost" in infra/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $# -eq 1 && "$1" =~ ^[1-9][0-9]*$ ]] || { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
load_running_settings || die "no cluster recorded in $STATE_DIR"
name="ray-worker-$1"
[[ -e "$(pid_file "$name")" ]] || die "no Ray worker $1 was started from $STATE_DIR"

# Freeze first: a stopped raylet starts no new worker and a stopped worker reports nothing,
# so the set of processes stops changing; then kill them all.
frozen=()
while true; do
    read -r -a pids <<<"$(node_pids "$name" | tr '\n' ' ')"
    new=()
    for pid in ${pids[@]+"${pids[@]}"}; do
        [[ " ${frozen[*]-} " == *" $pid "* ]] || new+=("$pid")
    done
    ((${#new[@]})) || break
    kill -STOP "${new[@]}" 2>/dev/null || true
    frozen+=("${new[@]}")
done
((${#frozen[@]})) || die "Ray worker $1 runs no process any more"
kill -KILL "${frozen[@]}" 2>/dev/null || true
for pid in "${frozen[@]}"; do
    while is_alive "$pid"; do sleep 0.1; done
done
log "killed Ray worker $1: ${#frozen[@]} process(es) (${frozen[*]})"

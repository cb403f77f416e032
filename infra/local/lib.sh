# shellcheck shell=bash
# shellcheck disable=SC2034  # the settings below are read by the scripts that source this file
# Shared by the infra/local scripts (sourced, never run): where things live, and how
# processes are started and stopped so that `stop.sh` can find every one of them.
#
# Every process is started with CLIP_RAY_INSTANCE=<state dir> in its environment.
# Ray passes its environment on to everything it spawns (raylets, workers, the
# processes of submitted jobs), so that marker finds them all again, even the ones
# that detach into their own process group. Nothing here uses `ray stop`: it kills
# every Ray process of the user, including clusters these scripts did not start.
#
# Settings (environment variables, all optional):
#   CLIP_RAY_STATE_DIR         pid files, logs, token, MLflow data   (<repo>/.clip-ray)
#   CLIP_RAY_TEMP_DIR          Ray's --temp-dir for the head; workers add -w1, -w2 ...
#                              (/tmp/clip-ray-<uid>-<checksum of the state dir>: Ray's
#                              socket paths must stay under 107 bytes)
#   CLIP_RAY_HEAD_PORT         GCS port of the head                 (6379)
#   CLIP_RAY_DASHBOARD_PORT    dashboard + jobs API, on 127.0.0.1   (8265)
#   CLIP_RAY_CLIENT_PORT       Ray Client server port               (10001)
#   CLIP_RAY_MLFLOW_PORT       MLflow server, on 127.0.0.1          (5000)
#   CLIP_RAY_HEAD_CPUS         logical CPUs of the head             (all cores)
#   CLIP_RAY_WORKER_CPUS       logical CPUs of each extra worker    (1)
#   CLIP_RAY_OBJECT_STORE_MB   object store of the head, workers get half (512; 100 at least)
#   CLIP_RAY_AUTH_MODE         token | disabled                     (token)
#   CLIP_RAY_START_TIMEOUT_S   how long to wait for each service    (120)

set -euo pipefail

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LOCAL_DIR/../.." && pwd)"

STATE_DIR="${CLIP_RAY_STATE_DIR:-$REPO_ROOT/.clip-ray}"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
# The state dir (token, logs, MLflow data) never belongs in git, wherever it is.
[[ -f "$STATE_DIR/.gitignore" ]] || printf '*\n' >"$STATE_DIR/.gitignore"
PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/logs"
ENV_FILE="$STATE_DIR/env.sh"
TOKEN_FILE="$STATE_DIR/ray-auth-token"
MLFLOW_DIR="$STATE_DIR/mlflow"

HEAD_PORT="${CLIP_RAY_HEAD_PORT:-6379}"
DASHBOARD_PORT="${CLIP_RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${CLIP_RAY_CLIENT_PORT:-10001}"
MLFLOW_PORT="${CLIP_RAY_MLFLOW_PORT:-5000}"
OBJECT_STORE_MB="${CLIP_RAY_OBJECT_STORE_MB:-512}"
WORKER_CPUS="${CLIP_RAY_WORKER_CPUS:-1}"
AUTH_MODE="${CLIP_RAY_AUTH_MODE:-token}"
START_TIMEOUT_S="${CLIP_RAY_START_TIMEOUT_S:-120}"
DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"

# The venv that holds ray[default] and mlflow: the active one, else the repo's .venv.
if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/ray" ]]; then
    VENV_BIN="$VIRTUAL_ENV/bin"
else
    VENV_BIN="$REPO_ROOT/.venv/bin"
fi
RAY="$VENV_BIN/ray"
MLFLOW="$VENV_BIN/mlflow"
PYTHON="$VENV_BIN/python"

log() { printf '[clip-ray] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_tools() {
    local tool
    for tool in "$RAY" "$MLFLOW" "$PYTHON"; do
        [[ -x "$tool" ]] || die "$tool not found: create the venv first (make setup) or activate one with ray[default] and mlflow"
    done
    command -v curl >/dev/null || die "curl is needed for the health checks"
}

ray_temp_dir() {
    # The head's Ray temp dir, as recorded at start (or as it would be chosen now).
    if [[ -f "$STATE_DIR/ray-temp-dir" ]]; then
        cat "$STATE_DIR/ray-temp-dir"
    elif [[ -n "${CLIP_RAY_TEMP_DIR:-}" ]]; then
        printf '%s\n' "$CLIP_RAY_TEMP_DIR"
    else
        printf '/tmp/clip-ray-%s-%s\n' "$(id -u)" "$(printf '%s' "$STATE_DIR" | cksum | cut -d' ' -f1)"
    fi
}

# --- processes --------------------------------------------------------------------

pid_file() { printf '%s/%s.pid\n' "$PID_DIR" "$1"; }

is_alive() {
    # A zombie counts as gone: it holds no port and runs no code.
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z* ]]
}

service_pid() {
    # The pid of a service started by these scripts, if it is still running.
    local file pid
    file="$(pid_file "$1")"
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    is_alive "$pid" && printf '%s\n' "$pid"
}

spawn() {
    # spawn NAME CMD...: runs CMD in the background in its own process group, marked
    # as belonging to this state dir, output to logs/NAME.log, pid to pids/NAME.pid.
    local name="$1"
    shift
    mkdir -p "$PID_DIR" "$LOG_DIR"
    (
        set -m  # job control: the background job becomes its own process group
        CLIP_RAY_INSTANCE="$STATE_DIR" nohup "$@" >"$LOG_DIR/$name.log" 2>&1 </dev/null &
        printf '%s\n' "$!" >"$(pid_file "$name")"
    )
}

marked_pids() {
    # marked_pids VAR=VALUE...: every live process whose environment holds all of them, whoever its parent is.
    local pid marker
    if [[ -r /proc/self/environ ]]; then
        grep -lzxF "$1" /proc/[0-9]*/environ 2>/dev/null | sed -e 's|^/proc/||' -e 's|/environ$||' |
            while read -r pid; do
                if [[ "$pid" == "$$" ]] || ! is_alive "$pid"; then continue; fi
                for marker in "${@:2}"; do
                    grep -qzxF "$marker" "/proc/$pid/environ" 2>/dev/null || continue 2
                done
                printf '%s\n' "$pid"
            done
    else  # macOS and BSDs: no /proc, but ps can show the environment of one's own processes
        local lines
        # shellcheck disable=SC2009  # pgrep cannot match on the environment
        lines="$(ps -E -ww -o pid= -o command=)"
        for marker in "$@"; do lines="$(grep -F " $marker " <<<"$lines" || true)"; done
        [[ -z "$lines" ]] || awk '{print $1}' <<<"$lines"
    fi
}

# Every live process that carries this state dir's marker.
instance_pids() { marked_pids "CLIP_RAY_INSTANCE=$STATE_DIR"; }

# Every live process of one Ray node (ray-head, ray-worker-N): add-worker.sh and start.sh mark each
# node's `ray start` with CLIP_RAY_NODE=<name>, and its raylet, agents and workers inherit it.
node_pids() { marked_pids "CLIP_RAY_INSTANCE=$STATE_DIR" "CLIP_RAY_NODE=$1"; }

terminate() {
    # terminate GRACE_S PID...: SIGTERM, wait up to GRACE_S seconds, then SIGKILL.
    local grace_s="$1" pid deadline
    shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    deadline=$((SECONDS + grace_s))
    while ((SECONDS < deadline)); do
        local alive=0
        for pid in "$@"; do is_alive "$pid" && alive=1; done
        ((alive)) || return 0
        sleep 0.5
    done
    for pid in "$@"; do
        if is_alive "$pid"; then
            log "pid $pid ignored SIGTERM for ${grace_s}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

wait_for() {
    # wait_for WHAT SERVICE CMD...: polls CMD until it succeeds; gives up when SERVICE
    # dies or after CLIP_RAY_START_TIMEOUT_S, showing the end of its log.
    local what="$1" service="$2" deadline=$((SECONDS + START_TIMEOUT_S)) failure=""
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ! service_pid "$service" >/dev/null; then
            failure="exited"
        elif ((SECONDS >= deadline)); then
            failure="did not come up within ${START_TIMEOUT_S}s"
        fi
        if [[ -n "$failure" ]]; then
            log "$what $failure; last lines of $LOG_DIR/$service.log:"
            tail -n 25 "$LOG_DIR/$service.log" >&2 || true
            return 1
        fi
        sleep 1
    done
}

# --- ports and HTTP ---------------------------------------------------------------

port_in_use() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", int(sys.argv[1])))
    except OSError:
        sys.exit(0)
sys.exit(1)
EOF
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1]); s.close()'
}

ray_auth_env() {
    # The environment a Ray client of this cluster needs (also written to env.sh).
    if [[ "$AUTH_MODE" == token ]]; then
        printf 'RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN_PATH=%s\n' "$TOKEN_FILE"
    else
        printf 'RAY_AUTH_MODE=disabled\n'
    fi
}

dashboard_get() {
    # GET a dashboard path with the token, if there is one.
    local header=()
    if [[ "$AUTH_MODE" == token && -f "$TOKEN_FILE" ]]; then
        header=(-H "Authorization: Bearer $(cat "$TOKEN_FILE")")
    fi
    curl -fsS --max-time 10 ${header[@]+"${header[@]}"} "$DASHBOARD_URL$1"
}

mlflow_healthy() { [[ "$(curl -fsS --max-time 5 "$MLFLOW_URL/health" 2>/dev/null)" == OK ]]; }

alive_node_count() {
    dashboard_get '/api/v0/nodes?limit=1000' | "$PYTHON" -c '
import json, sys
nodes = json.load(sys.stdin)["data"]["result"]["result"]
print(sum(node["state"] == "ALIVE" for node in nodes))'
}

node_count_is() { [[ "$(alive_node_count)" == "$1" ]]; }

worker_node_id() {
    # worker_node_id N: the Ray node id of worker N, from the names of the files its raylet writes into its
    # session dir (<temp>-wN is worker N's alone: add-worker.sh never reuses a number).
    local file
    for file in "$(ray_temp_dir)-w$1"/session_latest/*_port_*; do
        if [[ -e "$file" && "${file##*_}" =~ ^[0-9a-f]{56}$ ]]; then
            printf '%s\n' "${file##*_}"
            return 0
        fi
    done
    return 1
}

node_is_alive() {
    # node_is_alive NODE_ID: whether the head lists that node as ALIVE (a node counts, not how many there
    # are: a lost node stays ALIVE in the count until its health checks have failed).
    dashboard_get '/api/v0/nodes?limit=1000' | "$PYTHON" -c '
import json, sys
nodes = json.load(sys.stdin)["data"]["result"]["result"]
sys.exit(not any(node["node_id"] == sys.argv[1] and node["state"] == "ALIVE" for node in nodes))' "$1"
}

worker_is_alive() { local id; id="$(worker_node_id "$1")" && node_is_alive "$id"; }

ray_node_env() {
    # ray_node_env WITH_MLFLOW NODE: fills RAY_NODE_ENV, the `env ...` prefix of the `ray start` of
    # node NODE (ray-head, ray-worker-N). Jobs inherit this environment: `python` is the venv's,
    # MLflow and the token are found; CLIP_RAY_NODE marks every process of the node (node_pids).
    RAY_NODE_ENV=(env -u RAY_AUTH_TOKEN -u RAY_ADDRESS PATH="$VENV_BIN:$PATH" CLIP_RAY_NODE="$2"
        RAY_USAGE_STATS_ENABLED=0
        # Draining waits for Serve replicas; there are none here, so stop at once.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0)
    local line
    while read -r line; do RAY_NODE_ENV+=("$line"); done < <(ray_auth_env)
    if (($1)); then RAY_NODE_ENV+=(MLFLOW_TRACKING_URI="$MLFLOW_URL"); fi
}

write_env_file() {
    # env.sh: what a shell needs to submit jobs to, and track runs on, this cluster.
    local line
    {
        printf '# Written by infra/local/start.sh for %s: source it.\n' "$STATE_DIR"
        if [[ -f "$STATE_DIR/ray-address" ]]; then
            printf '# Drivers started here (python jobs/train.py) join the cluster:\n'
            printf 'export RAY_ADDRESS=%s\n' "$(cat "$STATE_DIR/ray-address")"
            printf '# ray job submit / logs / status / stop talk to the jobs API:\n'
            printf 'export RAY_API_SERVER_ADDRESS=%s\n' "$DASHBOARD_URL"
            printf 'unset RAY_AUTH_TOKEN  # it would take precedence over the token file\n'
            while read -r line; do printf 'export %s\n' "$line"; done < <(ray_auth_env)
        fi
        if [[ -f "$(pid_file mlflow)" ]]; then
            printf 'export MLFLOW_TRACKING_URI=%s\n' "$MLFLOW_URL"
        fi
    } >"$ENV_FILE"
}

load_running_settings() {
    # status/stop/add-worker talk to what start.sh started, whatever this shell's variables say.
    [[ -f "$STATE_DIR/settings" ]] || return 1
    # shellcheck source=/dev/null
    source "$STATE_DIR/settings"
    DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
    MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
}

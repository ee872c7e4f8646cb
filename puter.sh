#!/usr/bin/env bash
# BAT OS launcher (Linux/macOS). One command does the set-up on first run.
#
#   ./puter.sh [--demo] [--detach] [-- KERNEL OPTIONS]   start the system and open the chat client
#   ./puter.sh status                                    is the kernel up?
#   ./puter.sh stop                                      stop the watchdog and the kernel
#   ./puter.sh test [PYTEST ARGS]                        set up, then run the whole test suite
#   ./puter.sh setup                                     only install: the virtualenv and the code model
#
# Environment: PYTHON (interpreter for the virtualenv, default python3),
# BATOS_VENV (default .venv), BATOS_ENDPOINT (default tcp://127.0.0.1:5555),
# BATOS_EXTRAS (pip extras, default "llama,dev"), BATOS_MODEL (code model to install:
# auto, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b or none; default auto),
# BATOS_MODEL_DIR (model cache, default ~/.cache/batos/models).
#
# Exit status: 0 done; 1 a problem it names (bad option or address, a kernel
# that refused to start); 3 (status) no kernel answers.
### end of help
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${BATOS_VENV:-$here/.venv}"
py="$venv/bin/python"
extras="${BATOS_EXTRAS:-llama,dev}"
endpoint="${BATOS_ENDPOINT:-tcp://127.0.0.1:5555}"
logs="$here/logs"
pidfile="$logs/watchdog.pid"

say() { printf 'puter: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

ensure_venv() {
    local base="${PYTHON:-python3}"
    if [ ! -x "$py" ]; then
        command -v "$base" >/dev/null || die "$base not found; install Python 3.11 or set PYTHON"
        "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "$base is $("$base" --version 2>&1); BAT OS needs Python 3.11 or newer"
        say "creating the virtualenv in $venv"
        "$base" -m venv "$venv"
    fi
    # Reinstall when pyproject.toml changed since the last successful install.
    local stamp="$venv/.batos-installed" want
    want="$(cat pyproject.toml | cksum | cut -d' ' -f1)-$extras"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        say "installing BAT OS and its dependencies (first run: several minutes; llama-cpp-python compiles)"
        "$py" -m pip install --quiet --upgrade pip
        CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF}" \
            "$py" -m pip install --progress-bar off -e ".[$extras]"
        echo "$want" > "$stamp"
    fi
}

ensure_model() {
    # The code model the personas think with: downloaded once into the model cache,
    # checked against its pinned sha256, stored (linked, not copied) in the image.
    local model="${BATOS_MODEL:-auto}"
    [ "$model" = "none" ] && return 0
    "$py" batos.py models fetch "$model" \
        || die "the code model could not be installed (see above); BATOS_MODEL=none skips it"
}

watchdog_pid() {
    [ -f "$pidfile" ] || return 1
    local pid
    pid="$(cat "$pidfile")"
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

ping_kernel() {
    "$py" chat_client.py --ping --endpoint "$endpoint" --timeout "${1:-2}" >/dev/null 2>&1
}

# A malformed BATOS_ENDPOINT is refused at once, with the address to type instead.
check_endpoint() {
    local problem
    problem="$("$py" -c 'import sys
from batos_uvm.protocol import check_endpoint
try:
    check_endpoint(sys.argv[1])
except ValueError as exc:
    print(exc)' "$endpoint")" || problem="cannot check BATOS_ENDPOINT with $py"
    [ -z "$problem" ] || die "BATOS_ENDPOINT: $problem"
}

cmd_status() {
    local pid
    if pid="$(watchdog_pid)"; then
        say "watchdog running (PID $pid)"
        [ -f "$logs/watchdog.status.json" ] && cat "$logs/watchdog.status.json" && echo
    else
        say "watchdog not running"
    fi
    [ -x "$py" ] || { say "not set up yet: ./puter.sh setup"; return 3; }
    check_endpoint
    if ping_kernel 2; then
        say "kernel answers at $endpoint"
        return 0
    fi
    say "no kernel answers at $endpoint"
    return 3
}

cmd_stop() {
    local pid
    if ! pid="$(watchdog_pid)"; then
        say "not running"
        return 0
    fi
    say "stopping (watchdog PID $pid asks the kernel to shut down cleanly)"
    kill -TERM "$pid"
    for _ in $(seq 1 90); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "stopped"; return 0; }
        sleep 0.5
    done
    die "watchdog PID $pid did not stop within 45 s; see $logs/watchdog.jsonl"
}

cmd_start() {
    local detach=0 demo=() kernel_args=() client_args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --detach) detach=1 ;;
            --demo) demo=(--demo); client_args=(--no-model) ;;
            --) shift; kernel_args=("$@"); break ;;
            -h|--help) sed -n '2,/^### end of help/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; return 0 ;;
            *) die "unknown option $1 (see ./puter.sh --help)" ;;
        esac
        shift
    done
    ensure_venv
    check_endpoint
    [ ${#demo[@]} -gt 0 ] || ensure_model
    mkdir -p "$logs"
    if watchdog_pid >/dev/null; then
        say "already running; opening the chat client"
    else
        say "starting the watchdog and the kernel (logs in $logs)"
        nohup "$py" min_watchdog_service.py --python "$py" --log-dir "$logs" -- \
            --endpoint "$endpoint" ${demo[@]+"${demo[@]}"} ${kernel_args[@]+"${kernel_args[@]}"} \
            >"$logs/watchdog.out" 2>&1 &
        echo $! > "$pidfile"
        printf 'puter: waiting for the kernel' >&2
        for _ in $(seq 1 180); do
            if ping_kernel 2; then break; fi
            if ! watchdog_pid >/dev/null; then
                echo >&2
                tail -n 5 "$logs/kernel.log" >&2 || true
                die "the kernel did not start (above, from $logs/kernel.log)"
            fi
            printf '.' >&2
            sleep 1
        done
        echo >&2
        ping_kernel 5 || die "the kernel did not answer within 3 minutes; see $logs/kernel.log"
    fi
    # The demo replays a recording made with the rule translator's selectors.
    "$py" chat_client.py --endpoint "$endpoint" ${client_args[@]+"${client_args[@]}"} || true
    if [ "$detach" = 1 ]; then
        say "the kernel keeps running; ./puter.sh stop ends it"
        return 0
    fi
    local answer=y
    if [ -t 0 ]; then
        read -r -p "Stop the kernel? [Y/n] " answer || answer=y
    fi
    case "${answer:-y}" in
        n|N|no|No) say "the kernel keeps running; ./puter.sh stop ends it" ;;
        *) cmd_stop ;;
    esac
}

cmd_test() {
    ensure_venv
    ensure_model
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    "$py" -m ruff check .
    "$py" -m pytest "$@"
}

case "${1:-}" in
    status) cmd_status ;;
    stop) cmd_stop ;;
    test) shift; cmd_test "$@" ;;
    setup) ensure_venv; ensure_model; say "ready: $py" ;;
    *) cmd_start "$@" ;;
esac

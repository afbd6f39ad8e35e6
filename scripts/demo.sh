#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install everything, start runtimed on its
# defaults (socket /run/runtimed/runtimed.sock, root /var/lib/runtimed, state /run/runtimed),
# build a busybox image from Debian's busybox-static (no internet needed), import it and run
# containers from it with runtimectl. The daemon keeps running afterwards; stop it with:
#   kill "$(cat /run/runtimed/runtimed.pid)"
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
scripts/install.sh

SOCKET=/run/runtimed/runtimed.sock
PIDFILE=/run/runtimed/runtimed.pid
LOGFILE=/var/log/runtimed.log
RUNTIMECTL=(.venv/bin/runtimectl)

if .venv/bin/python - "$SOCKET" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError:
    sys.exit(1)
PY
then
    echo "[demo] runtimed already running on $SOCKET"
else
    echo "[demo] starting runtimed (log: $LOGFILE)"
    mkdir -p /run/runtimed
    setsid .venv/bin/runtimed >>"$LOGFILE" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 100); do
        [ -S "$SOCKET" ] && break
        sleep 0.1
    done
fi

run() { printf '\n$ runtimectl'; printf ' %q' "$@"; printf '\n'; "${RUNTIMECTL[@]}" "$@"; }
run version
run plugins ls

# A busybox image built locally from /bin/busybox (bench/'s generator, cached in bench/.cache).
ARCHIVE=$(.venv/bin/python -c 'from pathlib import Path; from bench.images import ensure_image
print(ensure_image("small", Path("bench/.cache"), log=lambda *_: None).archive)')
run import "$ARCHIVE"
run tag bench.local/runtimed/busybox:v1 busybox:local
run images

"${RUNTIMECTL[@]}" rm -f demo-sleeper >/dev/null 2>&1 || true   # a previous demo's
run run --rm --name demo-hello busybox:local echo "hello from a runtimed container"
run run -d --name demo-sleeper busybox:local sh -c 'echo started; sleep 300'
run ps
run exec demo-sleeper ls /
run logs --timestamps demo-sleeper
run stop -t 2 demo-sleeper
run ps -a
run rm demo-sleeper

# An image built from a Dockerfile (RUN runs in a container through the Tasks API), then run.
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
printf 'FROM busybox:local\nWORKDIR /app\nRUN echo "built by runtimectl build" > greeting\nCMD ["cat", "/app/greeting"]\n' \
    > "$CONTEXT/Dockerfile"
run build -t demo-app:v1 "$CONTEXT"
run run --rm demo-app:v1

# A named volume outlives the container that wrote into it.
"${RUNTIMECTL[@]}" volume rm -f demo-data >/dev/null 2>&1 || true
run volume create demo-data
run run --rm -v demo-data:/data busybox:local sh -c 'echo "kept in a volume" > /data/note'
run run --rm -v demo-data:/data busybox:local cat /data/note
run volume rm demo-data
echo
echo "[demo] runtimed is running (pid $(cat "$PIDFILE" 2>/dev/null || echo '?')); stop it with: kill \"\$(cat $PIDFILE)\""

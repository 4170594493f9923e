#!/usr/bin/env bash
# Checks Flower the way an archivist sees it, in a real headless browser: in a fresh data folder,
# starts Flower (with a password) and one tiny.en worker, queues 3 short clips and one broken
# file (a text file named broken.wav), waits for the jobs to settle, screenshots Flower's Tasks
# page with Chromium and checks /api/tasks: every task's kwargs names its file, and exactly the
# broken.wav task is in state FAILURE. Exits non-zero otherwise.
#   bash scripts/flower_screenshot.sh [OUT.png]      # default ./flower-tasks.png
set -euo pipefail

out=${1:-flower-tasks.png}
case $out in /*) ;; *) out=$PWD/$out ;; esac
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ -x .venv/bin/python ]; then py=$repo/.venv/bin/python; else py=$(command -v python3); fi
audio=${ARCHIVE_ASR_TEST_AUDIO:-/work/shared/audio/en}
clips=(timit_LDC93S1.wav
       librivox_sense_and_sensibility_01_austen_64kb-0880.wav
       librivox_sense_and_sensibility_01_austen_64kb-0930.wav)
limit_s=180

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (Debian package)..."
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

export ARCHIVE_ASR_DATA_DIR
ARCHIVE_ASR_DATA_DIR=$(mktemp -d)
work=$(mktemp -d)
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
password=$("$py" -c 'import secrets; print(secrets.token_urlsafe(18))')
flower_pid= worker_pid= ok=0

stop() {  # kill only what this script started, by pid; then the embedded broker
  local pid
  for pid in $worker_pid $flower_pid; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $worker_pid $flower_pid; do
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  "$py" -m cli broker stop || echo "warning: 'broker stop' failed" >&2
  if [ "$ok" = 1 ]; then
    rm -rf "$ARCHIVE_ASR_DATA_DIR" "$work"
  else
    echo "kept for inspection: data $ARCHIVE_ASR_DATA_DIR, logs $work" >&2
    tail -n 20 "$work"/flower.log "$work"/worker.log 2>/dev/null >&2 || true
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

echo "data folder $ARCHIVE_ASR_DATA_DIR, Flower on 127.0.0.1:$port"
"$py" -m cli flower --port "$port" --basic-auth "admin:$password" >"$work/flower.log" 2>&1 &
flower_pid=$!
api=http://127.0.0.1:$port/api
for _ in $(seq 1 60); do  # Flower answers (and has started the broker) before the worker comes
  curl -fsS -u "admin:$password" -o /dev/null "$api/workers" 2>/dev/null && break
  kill -0 "$flower_pid" 2>/dev/null || { echo "Flower exited" >&2; exit 1; }
  sleep 1
done
curl -fsS -u "admin:$password" -o /dev/null "$api/workers" || { echo "Flower does not answer" >&2; exit 1; }

"$py" -m cli worker --model tiny.en >"$work/worker.log" 2>&1 &
worker_pid=$!

mkdir "$work/audio"
for c in "${clips[@]}"; do cp "$audio/$c" "$work/audio/"; done
for _ in $(seq 1 20); do echo "not audio: an archivist's note saved with the wrong name"; done >"$work/audio/broken.wav"
"$py" -m cli enqueue --model tiny.en "$work/audio"

echo "waiting for the jobs to settle (at most ${limit_s}s)..."
start=$SECONDS
while :; do
  counts=$("$py" -m cli status --json | "$py" -c '
import json, sys
c = json.load(sys.stdin)["counts"]
print(c.get("queued", 0) + c.get("running", 0), c.get("done", 0), c.get("failed", 0))')
  read -r left n_done n_failed <<<"$counts"
  [ "$left" = 0 ] && break
  kill -0 "$worker_pid" 2>/dev/null || { echo "the worker exited" >&2; exit 1; }
  if (( SECONDS - start >= limit_s )); then echo "jobs still queued/running after ${limit_s}s" >&2; exit 1; fi
  sleep 2
done
echo "settled after $((SECONDS - start))s: $n_done done, $n_failed failed"

# Flower learns of tasks from events; give it a few seconds to record every one as ended.
n=$(( ${#clips[@]} + 1 ))
for _ in $(seq 1 30); do
  curl -fsS -u "admin:$password" "$api/tasks" >"$work/tasks.json"
  ended=$("$py" -c 'import json, sys; print(sum(t["state"] in ("SUCCESS", "FAILURE") for t in json.load(open(sys.argv[1])).values()))' "$work/tasks.json")
  [ "$ended" -ge "$n" ] && break
  sleep 1
done

# The Tasks page fills its table by XHR after load: give the page virtual time to render it.
chromium --headless --no-sandbox --disable-gpu --window-size=1600,1000 \
  --virtual-time-budget=15000 --screenshot="$out" \
  "http://admin:$password@127.0.0.1:$port/tasks" >"$work/chromium.log" 2>&1 \
  || { cat "$work/chromium.log" >&2; echo "chromium failed" >&2; exit 1; }
[ -s "$out" ] || { echo "no screenshot written" >&2; exit 1; }
echo "screenshot: $out"
# What the page itself shows (informational): `archive-asr flower` sets the Tasks list's columns
# so that each task's kwargs (its file and duration) and short result are shown.
chromium --headless --no-sandbox --disable-gpu --virtual-time-budget=15000 --dump-dom \
  "http://admin:$password@127.0.0.1:$port/tasks" >"$work/tasks.html" 2>>"$work/chromium.log" || true
shown=0
for c in "${clips[@]}" broken.wav; do grep -qF "$c" "$work/tasks.html" && shown=$((shown + 1)); done
echo "Tasks page: $(grep -o '>FAILURE<' "$work/tasks.html" | wc -l) FAILURE badge(s), names $shown of $n files"

"$py" - "$work/tasks.json" "$n" <<'EOF'
import ast, json, sys
from pathlib import PurePath

tasks = json.load(open(sys.argv[1]))
expected = int(sys.argv[2])
problems = []
names, failed = [], []
for uuid, t in tasks.items():
    try:
        kwargs = ast.literal_eval(t.get("kwargs") or "{}")  # Flower shows kwargs as a repr
    except (ValueError, SyntaxError):
        kwargs = {}
    path = kwargs.get("path") if isinstance(kwargs, dict) else None
    if not path:
        problems.append(f"task {uuid} ({t.get('name')}): kwargs name no file: {t.get('kwargs')!r}")
        continue
    name = PurePath(path).name
    names.append(name)
    print(f"  {t['state']:<8} {name}")
    if t["state"] == "FAILURE":
        failed.append((name, t.get("exception")))
if len(tasks) != expected:
    problems.append(f"{len(tasks)} tasks in Flower, expected {expected}")
if [n for n, _ in failed] != ["broken.wav"]:
    problems.append(f"tasks in FAILURE: {failed}, expected exactly broken.wav")
else:
    print(f"  broken.wav failed with: {failed[0][1]}")
for p in problems:
    print("FAIL:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
ok=1
echo "OK: every task names its file; only broken.wav is FAILURE"

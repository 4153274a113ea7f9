#!/usr/bin/env bash
# Wheel smoke: build the wheel, install it outside any checkout (a fresh venv, and pipx), then,
# from an empty folder, run a receiver on SQLite and on PostgreSQL: --version, db upgrade, serve,
# send a sample, export, costs. Usage: scripts/smoke.sh [PG_SERVER_URL]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
pg=${1:-${RECEIVER_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}}
work=$(mktemp -d /tmp/receiver-smoke.XXXXXX)
server=""
pgdb="receiver_smoke_$$"
admin="$root/.venv/bin/python"  # the dev venv (scripts/dev.sh) has psycopg, to make the database
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  "$admin" - "$pg" "$pgdb" <<'PYEOF' 2>/dev/null || true
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    c.execute(f'DROP DATABASE IF EXISTS "{sys.argv[2]}" WITH (FORCE)')
PYEOF
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf 'smoke: %s\n' "$*"; }

step "building the wheel"
"$PY" -m pip wheel -q --no-deps -w "$work/dist" "$root" >/dev/null
wheel=$(ls "$work"/dist/webrun_receiver-*.whl)
step "installing $(basename "$wheel") into a fresh venv"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel"
step "installing it with pipx"
"$PY" -m venv "$work/pipx-venv"
"$work/pipx-venv/bin/pip" install -q pipx
export PIPX_HOME="$work/pipx" PIPX_BIN_DIR="$work/pipx-bin"
"$work/pipx-venv/bin/pipx" install -q "$wheel" >/dev/null
"$work/pipx-bin/receiver" --version

run_on() {  # run_on NAME DATABASE_URL RECEIVER_BINARY
  local name=$1 url=$2 bin=$3 dir="$work/$1" port
  mkdir -p "$dir" && cd "$dir"
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export RECEIVER_DATABASE_URL=$url RECEIVER_TOKEN="Bearer smoke-$$"
  step "$name: $("$bin" --version)"
  "$bin" db upgrade
  "$bin" serve --port "$port" >"$dir/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 1 120); do
    "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/readyz', timeout=2)" \
      >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$dir/serve.log"; exit 1; }
    sleep 0.5
  done
  "$bin" send --url "http://127.0.0.1:$port/hooks/pricing?project=smoke" --sample 01-full-response-json
  local costs=""
  for _ in $(seq 1 60); do
    costs=$("$bin" costs --by hook --format json)
    case "$costs" in *'"cost_usd": 0.0124'*) break ;; esac
    sleep 0.5
  done
  case "$costs" in *'"cost_usd": 0.0124'*) ;; *) echo "smoke: $name: costs never showed the task: $costs"; exit 1 ;; esac
  "$bin" export --out "$dir/export" --lag 0 --quiet
  ls "$dir"/export/tasks/*/*.parquet >/dev/null
  ls "$dir"/export/results__pricing/*/*.parquet >/dev/null
  kill "$server"; wait "$server" || true; server=""
  step "$name: upgrade, serve, send, costs, export: ok"
  cd "$work"
}

run_on sqlite "sqlite:///$work/sqlite/data/receiver.db" "$work/venv/bin/receiver"
"$admin" - "$pg" "$pgdb" <<'PYEOF'
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as c:
    c.execute(f'CREATE DATABASE "{sys.argv[2]}"')
PYEOF
pgbase=${pg%/*}
run_on postgresql "postgresql+psycopg://${pgbase#postgresql://}/$pgdb" "$work/pipx-bin/receiver"

#!/usr/bin/env bash
# One entry point for the README's commands: `scripts/dev.sh serve` or `scripts/dev.sh test`
# (and `scripts/dev.sh smoke`: the wheel, installed outside the checkout, on both databases).
# Needs only Python 3.11 on PATH (python3.11 or python3); creates .venv and installs into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
case "${1:-}" in
  serve)
    shift
    exec .venv/bin/receiver serve "$@"
    ;;
  smoke)
    shift
    exec scripts/smoke.sh "$@"
    ;;
  test)
    shift
    # The console's browser tests drive Debian's Chromium (never `playwright install`).
    if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
      sudo_=$([ "$(id -u)" = 0 ] || echo sudo)
      $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium
    fi
    .venv/bin/ruff check receiver tests bench
    .venv/bin/ruff format --check receiver tests bench
    .venv/bin/mypy
    exec .venv/bin/pytest "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test|smoke [args]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Set up (venv, installs, Prometheus and procps for the tests, embedded model and demo adapter) and run the whole test suite. Extra arguments go to pytest,
# e.g. ./run_tests.sh -m "not integration" for the fast unit tier only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$("$ROOT/scripts/bootstrap.sh" dev)"
"$ROOT/scripts/test-deps.sh"
"$BIN/lcserve" embedded prepare >&2
"$BIN/lcserve" embedded train-adapter >&2
cd "$ROOT"
exec "$BIN/python" -m pytest "$@"

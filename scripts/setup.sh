#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh Debian machine with Python 3.11:
#   a local virtual environment from the pinned requirements, Java for METEOR where it can be
#   installed, and the offline demo dataset. `--dev` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "error: Python 3.11 is needed (apt-get install python3.11 python3.11-venv, or set PYTHON=...)" >&2; exit 2; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
# Reinstall only when the pinned requirements change.
stamp=".venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename $requirements .txt)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi

# METEOR runs on Java. Install it where we can (root on Debian); otherwise evaluate records meteor: null.
if ! command -v java >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null) \
      || echo "warning: could not install Java; METEOR will be reported as null" >&2
  else
    echo "warning: Java not found; install openjdk-17-jre-headless for METEOR (it will be null until then)" >&2
  fi
fi

.venv/bin/python -m captioning demo
echo "set-up done: activate with '. .venv/bin/activate'"

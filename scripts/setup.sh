#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh Debian machine with Python 3.11:
#   a local virtual environment from the pinned requirements, Java for METEOR where it can be
#   installed, the offline demo dataset, and the offline page template for `dvc plots show`.
#   `--dev` adds the test and lint tools (and Chromium, which the offline-plots test renders pages in).
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
dev=0
if [ "${1:-}" = "--dev" ]; then requirements=requirements-dev.txt; dev=1; fi

is_python311() { command -v "$1" >/dev/null && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if is_python311 "$candidate"; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "error: Python 3.11 is needed (apt-get install python3.11 python3.11-venv, or set PYTHON=...)" >&2; exit 2; }
# PYTHON is checked too: a venv of another version installs nothing (pyproject.toml: requires-python ==3.11.*).
is_python311 "$python" || { echo "error: PYTHON=$python is not Python 3.11 (set PYTHON to a python3.11, or unset it)" >&2; exit 2; }

# A venv of another Python (an earlier run's PYTHON) is made anew; else it would be kept, and fail, for good.
# A venv without pip is what a failed `python -m venv` leaves: on Debian without python3.11-venv it stops at
# ensurepip after writing .venv/bin/python (so does a Ctrl-C there). Creating it again over it adds pip.
if [ ! -x .venv/bin/python ] || ! is_python311 .venv/bin/python; then
  "$python" -m venv --clear .venv
elif ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  "$python" -m venv .venv
fi
# Reinstall only when the pinned requirements or the package's metadata change. The package itself is
# installed editable (the `captioning` command, importable from anywhere) with --no-deps: its
# dependencies are exactly the pinned requirements just installed.
pins=$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)
stamp=".venv/.installed-$pins-$(basename $requirements .txt)"
if [ ! -e "$stamp" ]; then
  # Other pins' stamps go first: after pins A, then B, A's stamp would skip this on a return to A (a checkout
  # of an older commit) with B's packages installed. Removed before pip runs, so an interrupted run redoes it.
  find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$pins-*" -delete
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi

# Debian packages, installed where we can (root with apt-get); one `apt-get update` for all of them.
apt_updated=0
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  if [ "$apt_updated" = 0 ]; then apt-get update -qq || return 1; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# METEOR runs on Java; without it evaluate records meteor: null.
if ! command -v java >/dev/null; then
  apt_install openjdk-17-jre-headless \
    || echo "warning: Java not found and not installable here; install openjdk-17-jre-headless for METEOR (it will be null until then)" >&2
fi
# tests/test_plots_offline.py renders `dvc plots show` pages in headless Chromium (it fails without it when CI=true);
# tests/test_server.py opens the server's page in it through Playwright (which never downloads a browser of its own).
if [ "$dev" = 1 ] && ! command -v chromium >/dev/null; then
  apt_install chromium || echo "warning: could not install chromium; the offline-plots test cannot run" >&2
fi

.venv/bin/python -m captioning demo
# `dvc plots show` offline: a page template with Vega, Vega-Lite and Vega-Embed inline (from the pinned
# vl-convert-python), registered in .dvc/config.local, which git ignores like the generated template itself.
.venv/bin/python -m captioning plots-template
.venv/bin/dvc config --local plots.html_template plots/offline.html
echo "set-up done: activate with '. .venv/bin/activate'"

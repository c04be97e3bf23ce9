#!/usr/bin/env bash
# Installs everything the app and the tests need into a project-local virtualenv.
# Debian packages (Chromium for the browser tests, GL libraries for off-screen VTK) are installed
# with apt-get when running as root and missing; Python packages go into the venv only.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
[ -e /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ] || need_apt+=(fonts-liberation)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || need_apt+=(libgl1)
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || need_apt+=(libegl1)
ldconfig -p 2>/dev/null | grep -q 'libOSMesa.so' || need_apt+=(libosmesa6)
ldconfig -p 2>/dev/null | grep -q 'libXrender.so.1' || need_apt+=(libxrender1)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install these Debian packages: ${need_apt[*]}" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch>=2.5,<3"         # CUDA build from PyPI on GPU machines
  else
    $PIP install torch==2.13.0           # CPU build (lies on local disk on this workplace's machines)
  fi
fi
$PIP install -r requirements.txt -r requirements-dev.txt
$PIP install --no-deps --no-build-isolation -e .          # photon_core (+ app, viz) importable from anywhere
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

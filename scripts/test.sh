#!/usr/bin/env bash
# Installs everything the tests need (torch 2.13.0, the CPU wheel pip finds here) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
python3 -m pytest -q tests src "$@"

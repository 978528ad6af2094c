#!/usr/bin/env bash
# Installs the library (torch 2.13.0, the CPU wheel pip finds here) and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" -e .
tensor-parallel demo "$@"

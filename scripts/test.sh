#!/usr/bin/env bash
# Installs everything the tests need (torch 2.13.0, the CPU wheel pip finds here) and runs them:
# the whole suite on the newest transformers, then the tests that touch transformers again on
# the oldest release pyproject.toml allows (its latest patch), in a venv over this one's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
python3 -m pytest -q tests src "$@"

oldest=$(python3 -c 'import re; print(re.search(r"\"transformers>=([0-9.]+)\"", open("pyproject.toml").read()).group(1))')
venv=.ci/venv-transformers-oldest
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$oldest.*"
echo "oldest supported transformers: $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" \
    tests/test_hf.py tests/test_autoplan.py tests/test_cuda_graphs.py tests/test_seed_flow.py tests/test_lora.py

#!/usr/bin/env bash
# Installs everything the tests need (torch 2.13.0, the CPU wheel pip finds here) and runs them:
# the whole suite on the newest transformers, then the tests that touch transformers again on
# the oldest release pyproject.toml allows (its latest patch), in a venv over this one's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
python3 -m pytest -q tests src "$@"

oldest=$(python3 -c 'import re; print(re.search(r"\"transformers>=([0-9.]+)", open("pyproject.toml").read()).group(1))')
venv=.ci/venv-transformers-oldest
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || { rm -rf "$venv"; python3 -m venv "$venv"; }
# the packages of the python3 that ran the first pass (a venv's too, which --system-site-packages
# would miss), after the venv's own: only transformers and what it pins differ
python3 - "$venv" <<'PY'
import pathlib, site, sys, sysconfig
outer = [p for p in site.getsitepackages() if pathlib.Path(p).is_dir()]
inner = pathlib.Path(sys.argv[1]) / pathlib.Path(sysconfig.get_path("purelib")).relative_to(sys.prefix)
(inner / "_outer_packages.pth").write_text(f"import site; list(map(site.addsitedir, {outer!r}))\n")
PY
"$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$oldest.*"
echo "oldest supported transformers: $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" \
    tests/test_hf.py tests/test_autoplan.py tests/test_cuda_graphs.py tests/test_seed_flow.py tests/test_lora.py

"""One entry point for every benchmark: ``python -m benchmarks.run [names...]``.

Runs the chosen benchmarks (default: all) one after another, each writing its report, a PNG
chart and its data under benchmarks/results/ (the latest run) and a dated copy per machine
under benchmarks/results/history/. Sets up the original library's venv for the peer
comparison when it is missing (``--peer-venv``, default benchmarks/.peer-venv).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys

logger = logging.getLogger("benchmarks.run")
HERE = os.path.dirname(os.path.abspath(__file__))
#: name -> the module's arguments
BENCHMARKS = {"speed": ["benchmarks.speed"], "multiprocess": ["benchmarks.multiprocess"],
              "loading": ["benchmarks.loading"], "sharding": ["benchmarks.sharding"],
              "coverage": ["benchmarks.coverage"], "gpu": ["benchmarks.gpu"],
              "coverage-generic": ["benchmarks.coverage", "--plans", "generic"]}

# The original library's last working stack (shared/notes/anchors.md), in a venv of its own,
# with our torch: torch 2.13 asks for setuptools>=77 only as metadata, while the original
# imports pkg_resources (setuptools<70), so the old setuptools goes in last without its
# dependencies; else pip falls back to torch 2.12.1, a multi-GB CUDA build.
PEER_INSTALL = (["torch==2.13.0"],
                ["torch==2.13.0", "transformers==4.33.3", "accelerate==0.22.0", "numpy<2",
                 "tensor-parallel==2.0.0", "safetensors", "psutil"],
                ["--no-deps", "setuptools<70"])
_DONE = "tensor_parallel-peer.json"  # written last: a venv without it is incomplete


def ensure_peer_venv(path: str) -> str | None:
    """The original tensor_parallel 2.0.0 in a venv at ``path``, (re)created when missing,
    incomplete or installed from another recipe; None if it cannot be set up."""
    python, marker = os.path.join(path, "bin", "python"), os.path.join(path, _DONE)
    if os.path.exists(marker):
        with open(marker) as handle:
            if json.load(handle) == [list(step) for step in PEER_INSTALL]:
                return path
    logger.info("creating the original library's venv at %s (a few minutes) ...", path)
    shutil.rmtree(path, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        for packages in PEER_INSTALL:
            subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True, timeout=1800)
        subprocess.run([python, "-c", "import tensor_parallel, transformers"], check=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        logger.error("could not set up the original library (%s); its columns stay empty", error)
        shutil.rmtree(path, ignore_errors=True)
        return None
    with open(marker, "w") as handle:
        json.dump([list(step) for step in PEER_INSTALL], handle)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, among {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--peer-venv", default=os.path.join(HERE, ".peer-venv"),
                        help="venv of the original library (created when missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose among {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
        command = [sys.executable, "-m", *BENCHMARKS[name]]
        if name == "speed":
            peer = ensure_peer_venv(args.peer_venv)
            command += ["--peer-venv", peer] if peer else []
        logger.info("== %s: %s", name, " ".join(command[1:]))
        if subprocess.run(command, cwd=os.path.dirname(HERE)).returncode != 0:
            failed.append(name)
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

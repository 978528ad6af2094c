"""One entry point for every benchmark: ``python -m benchmarks.run [names...]``.

Runs the chosen benchmarks (default: all) one after another, each writing its dated report
under benchmarks/results/, and sets up the original library's venv for the peer comparison
when it is missing (``--peer-venv``, default benchmarks/.peer-venv; the exact install of
shared/notes/anchors.md). Reports are kept, one file per run and date, as the history.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

logger = logging.getLogger("benchmarks.run")
HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("speed", "multiprocess", "loading", "sharding", "coverage")

# shared/notes/anchors.md: the original library's last working stack, in a venv of its own
PEER_INSTALL = (["torch==2.13.0"],
                ["transformers==4.33.3", "accelerate==0.22.0", "setuptools<70", "numpy<2",
                 "tensor-parallel==2.0.0", "safetensors", "psutil"])


def ensure_peer_venv(path: str) -> str | None:
    """The original tensor_parallel 2.0.0 in a venv at ``path``, created when missing."""
    python = os.path.join(path, "bin", "python")
    if os.path.exists(python):
        return path
    logger.info("creating the original library's venv at %s ...", path)
    try:
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        for packages in PEER_INSTALL:
            subprocess.run([python, "-m", "pip", "install", "-q", *packages], check=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        logger.error("could not set up the original library (%s); its column stays empty", error)
        return None
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
        command = [sys.executable, "-m", f"benchmarks.{name}"]
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

"""The ``tensor-parallel`` command: the jobs people script."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tensor-parallel`` command line.

    Example::

        >>> from tensor_parallel.cli import main
        >>> main(["demo", "--devices", "2", "--quiet"])
        0
    """
    parser = argparse.ArgumentParser(prog="tensor-parallel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="split a small GPT over CPU devices and check it")
    demo.add_argument("--devices", type=int, default=2, help="number of CPU devices (default 2)")
    demo.add_argument("--quiet", action="store_true", help="print nothing, only check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from .demo import run_demo
        report = run_demo(args.devices)
        if not args.quiet:
            sys.stdout.write(report + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

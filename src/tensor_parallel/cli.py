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
    shard = commands.add_parser("shard", help="write a checkpoint pre-split for N devices")
    shard.add_argument("src", help="a checkpoint folder (ordinary, or split for any device count)")
    shard.add_argument("dst", help="the folder to write")
    shard.add_argument("--devices", type=int, required=True, help="number of devices to split for")
    merge = commands.add_parser("merge", help="write a split checkpoint back as an ordinary one")
    merge.add_argument("src", help="a folder written by 'shard' or by save_pretrained of a split model")
    merge.add_argument("dst", help="the folder to write")
    for sub in (shard, merge):
        sub.add_argument("--max-shard-size", default="5GB", help="largest file to write (default 5GB)")
        sub.add_argument("--bin", action="store_true", help="write pickled .bin files, not safetensors")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from .demo import run_demo
        report = run_demo(args.devices)
        if not args.quiet:
            sys.stdout.write(report + "\n")
        return 0
    return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .hf.convert import merge_checkpoint, shard_checkpoint

    options = dict(max_shard_size=args.max_shard_size, safe_serialization=not args.bin,
                   progress=False if args.no_progress else None)
    if args.command == "shard" and args.devices < 1:
        sys.stderr.write("tensor-parallel shard: --devices must be at least 1\n")
        return 2
    try:
        if args.command == "shard":
            shard_checkpoint(args.src, args.dst, args.devices, **options)
        else:
            merge_checkpoint(args.src, args.dst, **options)
    except (CheckpointError, ValueError, OSError) as error:
        sys.stderr.write(f"tensor-parallel {args.command}: {error}\n")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

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
    plan = commands.add_parser("plan", help="print the plan for a transformers model, and its collectives")
    plan.add_argument("model", help="a checkpoint or config folder, or a model type such as llama")
    plan.add_argument("--devices", type=int, default=2, help="number of devices (default 2)")
    plan.add_argument("--automatic", action="store_true",
                      help="the automatic planner's plan, ignoring built-in and shipped plans")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "plan":
        return _print_plan(args.model, args.devices, args.automatic)
    if args.command == "demo":
        from .demo import run_demo
        report = run_demo(args.devices)
        if not args.quiet:
            sys.stdout.write(report + "\n")
        return 0
    return _convert(args)


def _print_plan(model: str, devices: int, automatic: bool = False) -> int:
    import os

    import transformers
    from accelerate import init_empty_weights

    from .plan import expected_collectives, format_plan, plan_for

    try:
        config = (transformers.AutoConfig.from_pretrained(model) if os.path.isdir(model)
                  else transformers.AutoConfig.for_model(model))
    except (ValueError, OSError) as error:
        sys.stderr.write(f"tensor-parallel plan: {error}\n")
        return 1
    with init_empty_weights():
        module = transformers.AutoModelForCausalLM.from_config(config)
    if automatic:
        from .hf.plans import _probe_inputs
        plan = plan_for(module, devices, example_inputs=_probe_inputs(module), builtin=False)
    else:
        plan = plan_for(module, devices)
    counts = expected_collectives(module, plan, devices)
    sys.stdout.write(format_plan(plan) + "\n")
    sys.stdout.write(f"collectives per forward over {devices} devices: "
                     + (", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items())) or "none") + "\n")
    return 0


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

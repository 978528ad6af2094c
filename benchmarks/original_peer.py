"""The original tensor_parallel 2.0.0, measured in its own venv (its import name clashes with
ours): ``V/bin/python benchmarks/original_peer.py serve MODEL_DIR`` or ``... comm SPECS_JSON``.

``comm`` prints one JSON object on its last line. ``serve`` loads and splits the model, prints
one JSON line (memory per device, collectives of a 128-token forward), then answers each line
``forward`` or ``decode`` on its standard input with the seconds of one such run (a JSON
number) until ``quit``, so that the caller can interleave its contenders run by run. Run by :mod:`benchmarks.speed`; it imports nothing of
ours except the shared timing function, so the two libraries are timed by the same code.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for benchmarks.*

import torch  # noqa: E402
import transformers  # noqa: E402

import tensor_parallel as original  # noqa: E402
from tensor_parallel import communications  # noqa: E402

assert metadata.version("tensor_parallel") == "2.0.0", "run me in the original library's venv"


class Counter:
    """Collectives of rank 0, by kind, with the bytes each rank holds after them (as ours)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.inside = threading.local()

    def record(self, kind: str, tensor: torch.Tensor) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()

    def install(self) -> None:
        """Wrap the original's thread-parallel AllReduce and AllGather (an AllReduce runs an
        AllGather inside: counted once, as an all-reduce)."""
        counter = self
        reduce_call, gather_call = communications.AllReduce.__call__, communications.AllGather.__call__

        def all_reduce(op, x, rank):
            counter.inside.depth = getattr(counter.inside, "depth", 0) + 1
            try:
                out = reduce_call(op, x, rank)
            finally:
                counter.inside.depth -= 1
            if rank == 0:
                counter.record("all_reduce", out)
            return out

        def all_gather(op, x, rank):
            out = gather_call(op, x, rank)
            if rank == 0 and not getattr(counter.inside, "depth", 0):
                counter.record("all_gather", out)
            return out

        communications.AllReduce.__call__ = all_reduce
        communications.AllGather.__call__ = all_gather


COUNTER = Counter()
COUNTER.install()


def split(model):
    return original.tensor_parallel(model, ["cpu", "cpu"], sharded=False).eval()


def memory(model) -> list[int]:
    """Bytes of parameters and buffers on each device."""
    per_device = []
    for shard in model.wrapped_model.module_shards:
        tensors = {id(t): t for t in [*shard.parameters(), *shard.buffers()]}
        per_device.append(sum(t.numel() * t.element_size() for t in tensors.values()))
    return per_device


def serve(path: str) -> None:
    from benchmarks.multiprocess import time_one, warm_up

    model = split(transformers.AutoModelForCausalLM.from_pretrained(path))
    torch.manual_seed(0)
    with torch.no_grad():
        COUNTER.calls.clear()
        COUNTER.bytes.clear()
        model(torch.randint(3, 32000, (1, 128)))
        comm = {"calls": dict(COUNTER.calls), "bytes": sum(COUNTER.bytes.values())}
    warm_up(model)
    print(json.dumps({"memory": memory(model), "comm": comm}), flush=True)
    for line in sys.stdin:
        what = line.strip()
        if what not in ("forward", "decode"):
            break
        print(json.dumps(time_one(model, what)), flush=True)


def comm(specs: dict) -> dict:
    """Collectives of one forward of each model (``name: [config class, kwargs, tokens]``)."""
    results = {}
    for name, (config_class, kwargs, tokens) in specs.items():
        config_type = getattr(transformers, config_class, None)
        if config_type is None:
            results[name] = {"error": f"transformers {transformers.__version__} has no {config_class}",
                             "absent": True}
            continue
        try:
            torch.manual_seed(0)
            auto = (transformers.AutoModelForSeq2SeqLM if name == "t5" else transformers.AutoModelForMaskedLM
                    if name in ("bert", "roberta") else transformers.AutoModelForCausalLM)
            model = split(auto.from_config(config_type(**kwargs)))
            ids = torch.randint(3, kwargs.get("vocab_size", 1000), (1, tokens))
            extra = {"decoder_input_ids": ids} if name == "t5" else {}
            COUNTER.calls.clear()
            COUNTER.bytes.clear()
            with torch.no_grad():
                model(ids, **extra)
            results[name] = {"calls": dict(COUNTER.calls), "bytes": sum(COUNTER.bytes.values())}
        except Exception as error:  # reported in the table, as the original's failure
            results[name] = {"error": f"{type(error).__name__}: ...{str(error)[-300:]}"}
    return results


if __name__ == "__main__":
    command, argument = sys.argv[1], sys.argv[2]
    if command == "serve":
        serve(argument)
    else:
        print(json.dumps(comm(json.loads(argument))))

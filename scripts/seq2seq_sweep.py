"""Every sequence-to-sequence type of the installed transformers, split over 2 and 3 CPU devices.

For each type in ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``: the default config shrunk to
tiny size (the coverage benchmark's shrinking; a missing decoder start token becomes 0), the
logits of a forward with decoder inputs and 5 greedy tokens, unsharded and split, compared.
Each type runs in a child process with a time limit. Prints one line per type and a total.
Run from the repository root: ``python scripts/seq2seq_sweep.py [types...]``.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 120


def check(model_type: str) -> str:
    import torch
    import transformers

    import tensor_parallel as tp
    from benchmarks.coverage import describe_error, make_input_ids, tiny_config

    try:
        config = tiny_config(model_type)
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = 0
        model_class = transformers.AutoModelForSeq2SeqLM._model_mapping[type(config)]
        torch.manual_seed(0)
        model = model_class._from_config(config, attn_implementation="eager").float().eval()
        ids = make_input_ids(config)
        with torch.no_grad():
            expected = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
            tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    except Exception as error:  # the model itself fails at tiny size: not ours to judge
        return f"unsharded_fails {describe_error(error)[:150]}"
    parts = []
    for n in (2, 3):
        try:
            split = tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * n, timeout=60)
            with torch.no_grad():
                diff = (split(input_ids=ids, decoder_input_ids=ids[:, :4]).logits - expected).abs().max().item()
                same = torch.equal(split.generate(ids[:1], max_new_tokens=5, do_sample=False), tokens)
        except Exception as error:  # recorded: a failure of ours
            return f"fails x{n}: {describe_error(error)[:150]}"
        if diff > 1e-4 or not same:  # the coverage benchmark's tolerance
            return f"differs x{n}: logits {diff:.1e}, greedy tokens equal {same}"
        parts.append(f"x{n} logits {diff:.1e}")
    return "correct " + ", ".join(parts) + ", greedy tokens equal"


def main(types: list[str]) -> int:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    counts: dict[str, int] = {}
    for model_type in types or list(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        try:
            done = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True,
                                  text=True, timeout=TIMEOUT_S)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"crashed rc={done.returncode}"
        except subprocess.TimeoutExpired:
            line = f"timeout after {TIMEOUT_S} s"
        counts[line.split()[0]] = counts.get(line.split()[0], 0) + 1
        print(f"{model_type:24s} {line}", flush=True)
    print("total:", counts)
    return 0 if set(counts) <= {"correct", "unsharded_fails"} else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        logging.disable(logging.WARNING)
        print(check(sys.argv[2]))
    else:
        raise SystemExit(main(sys.argv[1:]))

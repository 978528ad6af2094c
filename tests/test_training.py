"""Training paths: transformers' Trainer (plain, sharded=True, LoRA), and bf16 weights and
autocast on the CPU."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch.utils.data import Dataset

import tensor_parallel as tp

CONFIG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2)


class _Tokens(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        ids = torch.randint(3, 97, (8,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def _train(model, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("variant", ["plain", "sharded", "lora"])
def test_trainer_gives_the_losses_of_the_unsharded_run(tmp_path, variant):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    if variant == "lora":  # adapters on column (q) and row (o, down) splits; only they train
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False,
                                                           target_modules=["q_proj", "o_proj", "down_proj"]))
    expected = _train(copy.deepcopy(model), tmp_path / "plain")
    split = tp.tensor_parallel(copy.deepcopy(model), ["cpu", "cpu"], sharded=variant == "sharded")
    actual = _train(split, tmp_path / "split")
    # 4 optimizer steps of float32 AdamW: the losses agree to float32 rounding of the
    # different summation order, amplified a little by each step
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert len(actual) == 4


def test_bf16_weights_and_autocast():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        reference = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = tp.tensor_parallel(copy.deepcopy(model), ["cpu"] * 3)(ids).logits
        weights = tp.tensor_parallel(copy.deepcopy(model).to(torch.bfloat16), ["cpu"] * 3)(ids).logits
        sharded = tp.tensor_parallel(copy.deepcopy(model).to(torch.bfloat16), ["cpu"] * 3, sharded=True)(ids).logits
    assert autocast.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16
    assert torch.equal(sharded, weights)  # the gathered pieces are the very bf16 values
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%); through 2 layers and a
    # sum over 48 features the logits (of size ~0.1 here) move by up to a few 1e-2
    torch.testing.assert_close(autocast.float(), reference, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(weights.float(), reference, atol=5e-2, rtol=5e-2)

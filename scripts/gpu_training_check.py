"""One-GPU check of sharded=True and LoRA with every rank on CUDA (threads on one GPU).

Prints, for llama and GPT-2 split over 2 and 3 ranks with sharded=True, and for LoRA in both
orders, the largest difference of the logits and of the gradients from the unsharded model on
the same GPU, and the time of a bf16 training step of a 8-layer, 1024-wide llama with and
without sharded=True. Run from the repository root on a machine with a GPU:
``PYTHONPATH=src python scripts/gpu_training_check.py`` (``... cpu`` runs the small checks on the CPU).
"""
import copy, sys, time
import torch, transformers, peft
sys.path.insert(0, "tests")
import tensor_parallel as tp
import hf_models
sys.path.insert(0, "scripts")
from gpu_check import worst_grad as grads_of  # one gradient comparison for both checks

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda:0"
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, dev)
torch.backends.cuda.matmul.allow_tf32 = False
IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], device=dev)
results = []

for n in (2, 3):
    for name in ("llama", "gpt2"):
        ref = hf_models.build(name).to(dev)
        model = tp.tensor_parallel(copy.deepcopy(ref), [dev] * n, sharded=True)
        with tp.count_collectives() as st:
            out = model(IDS, labels=IDS)
            out.loss.backward()
        exp = ref(IDS, labels=IDS); exp.loss.backward()
        d = (out.logits - exp.logits).abs().max().item()
        g = grads_of(model.wrapped_model, ref)
        results.append((f"sharded {name} x{n}", d, g, dict(st.calls)))
    # LoRA, peft first and peft on the split model
    torch.manual_seed(1)
    base = hf_models.build("llama").to(dev)
    cfg = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"], init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    split = tp.tensor_parallel(ref, [dev] * n)
    out, exp = split(input_ids=IDS, labels=IDS), ref(input_ids=IDS, labels=IDS)
    out.loss.backward(); exp.loss.backward()
    results.append((f"lora peft-first x{n}", (out.logits - exp.logits).abs().max().item(),
                    grads_of(split.base_model.model.wrapped_model, ref.base_model.model), None))
    b = peft.get_peft_model(tp.tensor_parallel(copy.deepcopy(base), [dev] * n, sharded=True), peft.LoraConfig(**cfg))
    with torch.no_grad():
        a = b(input_ids=IDS).logits
        with tp.save_tensor_parallel(b):
            b.save_pretrained(f"/tmp/adapter{n}")
        r = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"/tmp/adapter{n}")(input_ids=IDS).logits
        merged = b.merge_and_unload()(input_ids=IDS).logits
    results.append((f"lora on split+sharded x{n}", (a - r).abs().max().item(), (merged - a).abs().max().item(), None))

if dev == "cpu":
    for row in results: print(row)
    sys.exit(0)
# a step of bf16 training with sharded=True on a mid-size llama, timed
cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=4)
torch.manual_seed(0)
big = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16)
ids = torch.randint(0, 32000, (4, 256), device=dev)
for sharded in (False, True):
    m = tp.tensor_parallel(copy.deepcopy(big), [dev, dev], sharded=sharded)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    for i in range(3):
        torch.cuda.synchronize(); t = time.perf_counter()
        m(ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
        torch.cuda.synchronize(); dt = time.perf_counter() - t
    print(f"bf16 llama 8x1024 train step, 2 ranks on one GPU, sharded={sharded}: {dt*1e3:.0f} ms")
for row in results:
    print(row)
print("max logits diff", max(r[1] for r in results))

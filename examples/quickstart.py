"""Optimize a DeepSeek-V3-style model for two chips and check that generate gives the same tokens.

    python examples/quickstart.py

Uses a tiny random-weight model built from a config (nothing is downloaded); swap in
``AutoModelForCausalLM.from_pretrained(...)`` for a real checkpoint.
"""

import copy

import torch
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.tiny import tiny_deepseek_v3

torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_deepseek_v3(q_lora_rank=24)).eval()
prompt = torch.randint(0, model.config.vocab_size, (1, 12))
expected = model.generate(prompt, max_new_tokens=16, do_sample=False)

for target, s_q in (("h100", 1), ("h20", 2)):
    optimized = gqla_compile.optimize(copy.deepcopy(model), target=target, s_q=s_q, compile=False)
    tokens = optimized.generate(prompt, max_new_tokens=16, do_sample=False)
    state = optimized.gqla_optimization
    print(f"{target} (s_q={s_q}): {state.path} path, same tokens: {torch.equal(tokens, expected)}")
    print(f"  {state.plan.reason}")

# The paper's shapes, planned without building them (bf16): DeepSeek-V3-shaped GQLA and LLaMA-3-8B after TransGQLA.
references = gqla_compile.cost_model.reference_configs()
for name, config in references.items():
    for target, s_q in (("h100", 1), ("h20", 2)):
        print(f"{name} on {target}, s_q={s_q}: {gqla_compile.plan(config, target=target, s_q=s_q).path}")

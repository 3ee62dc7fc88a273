"""Sparse latent attention (DSA, DeepSeek-V3.2): one decode step at a long context for several index top-k.

    python -m benchmarks.dsa [--quick] [--threads 1] [--out benchmarks/results]

A DeepSeek-V3.2-shaped model (the head dims of the released model: d_c 512, d_R 64, d_n 128, d_v 128, index
head dim 128 with 64 index heads; fewer query heads and layers, so that the unmodified model's step fits a
single CPU thread) decodes one token over a cache of ``context`` tokens, for each (context, k) point: the
unmodified transformers model against both rewritten paths, all eager (Inductor's first compile of this shape
takes minutes per variant on a shared CPU; tests/test_sparse.py checks that the compiled DSA models run with
no graph break). The cache is a DynamicCache filled with random keys (and the indexer's random index keys),
cropped back to the context after every step.

Besides the whole step, forward hooks time each attention block's parts (eager only):

- indexer: the family's indexer (unmodified model) or the kept selection graph with its cache update
  (rewritten paths): it scores every cached index key, so it grows with the context;
- attention: the rest of the block. Unmodified: the projections, the expansion of the whole context's
  latents and attention over the context (masked to k). Rewritten paths: the attention core only (gather
  of the k selected rows, attention over them, W_UV and o_proj), which grows with k.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from . import common

VARIANTS = ("original", "absorbed", "grouped")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"points": [(64, 4), (64, 16), (32, 16)], "repeats": 1,
                "config": dict(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_n_heads=4,
                               index_head_dim=16, intermediate_size=64, vocab_size=256)}
    return {"points": [(8192, 64), (8192, 512), (8192, 2048), (2048, 512)], "repeats": 3,
            "config": dict(hidden_size=2048, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512,
                           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, index_n_heads=64,
                           index_head_dim=128, intermediate_size=1024, vocab_size=2048)}


def model_config(quick: bool, top_k: int):
    from transformers import DeepseekV32Config

    dims = settings(quick)["config"]
    return DeepseekV32Config(**dims, num_hidden_layers=2, num_key_value_heads=dims["num_attention_heads"],
                             first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32,
                             n_shared_experts=1, n_group=1, topk_group=1, index_topk=top_k,
                             max_position_embeddings=16384, tie_word_embeddings=False)


def _filled_cache(model, context: int, generator: torch.Generator):
    """A DynamicCache of the model's own layers holding ``context`` random tokens in the model's layout (keys,
    values and the indexer's keys, shapes read off one eager one-token call)."""
    from transformers import DynamicCache

    probe = DynamicCache(config=model.config)
    with torch.no_grad():
        common.eager_forward(model)(input_ids=torch.zeros(1, 1, dtype=torch.long), cache=probe, use_cache=True)
    cache = DynamicCache(config=model.config)
    for layer, seen in zip(cache.layers, probe.layers):
        layer.update(torch.randn(seen.keys.shape[:2] + (context,) + seen.keys.shape[3:], generator=generator),
                     torch.randn(seen.values.shape[:2] + (context,) + seen.values.shape[3:], generator=generator))
        layer.update_indexer(torch.randn(1, context, seen.indexer_keys.shape[-1], generator=generator))
    return cache


class _PartTimer:
    """Seconds spent in the modules of each part during one step, summed over layers (forward hooks)."""

    def __init__(self, parts: dict[str, list[torch.nn.Module]]):
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles = []
        for part, modules in parts.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._start(module)))
                self._handles.append(module.register_forward_hook(self._stop(part, module)))
        self._started: dict[int, float] = {}

    def _start(self, module):
        def hook(*_):
            self._started[id(module)] = time.perf_counter()
        return hook

    def _stop(self, part, module):
        def hook(*_):
            self.seconds[part] += time.perf_counter() - self._started.pop(id(module))
        return hook

    def take(self) -> dict[str, float]:
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _parts(model, variant: str) -> dict[str, list[torch.nn.Module]]:
    blocks = [m for m in model.modules() if hasattr(m, "kv_a_proj_with_mqa")]
    if variant == "original":
        return {"block": blocks, "indexer": [b.indexer for b in blocks if getattr(b, "indexer", None) is not None]}
    runtimes = [b.gqla_runtime for b in blocks]
    return {"block": blocks, "indexer": [r.selection for r in runtimes], "attention": [r.core for r in runtimes]}


def _time_variant(model, variant: str, context: int, repeats: int) -> dict[str, Any]:
    cache = _filled_cache(model, context, torch.Generator().manual_seed(0))
    token = torch.tensor([[1]])
    timer = _PartTimer(_parts(model, variant))
    steps, parts = [], []
    try:
        for repeat in range(repeats + 1):  # the first step warms up
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            elapsed = time.perf_counter() - start
            cache.crop(-1)  # back to the context: drop the step's token
            seconds = timer.take()
            if repeat:
                steps.append(elapsed)
                parts.append(seconds)
    finally:
        timer.close()
    median = {name: statistics.median(p[name] for p in parts) for name in parts[0]}
    if variant == "original":  # the block minus its indexer
        median["attention"] = median["block"] - median["indexer"]
    return {"step_s": statistics.median(steps), "step": common.Timing.of(steps).to_dict(),
            "indexer_s": median["indexer"], "attention_s": median["attention"], "block_s": median["block"]}


def run(out: str, *, quick: bool = False) -> dict[str, Any]:
    """Every (context, k) point of the settings and variant; writes ``<out>/dsa.json`` and returns the payload.
    The points vary k at one context (the attention part) and the context at one k (the indexer part)."""
    import gqla_compile

    conf = settings(quick)
    machine = common.machine_info()
    rows = []
    base = common.build_model(model_config(quick, conf["points"][0][1]))
    for context, top_k in conf["points"]:
        original = copy.deepcopy(base)
        for module in original.modules():
            if isinstance(getattr(module, "index_topk", None), int):
                module.index_topk = top_k
        row: dict[str, Any] = {"top_k": top_k, "context": context}
        for variant in VARIANTS:
            model = original
            if variant != "original":
                model = copy.deepcopy(original)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gqla_compile.optimize(model, path=variant, target="cpu", compile=False)
            row[variant] = _time_variant(model, variant, context, conf["repeats"])
            del model
        for variant in ("absorbed", "grouped"):
            row[f"{variant}_speedup"] = common.ratio(row["original"]["step_s"], row[variant]["step_s"])
        rows.append(row)
    payload = {"part": "dsa", "quick": quick, "machine": machine, "compiled": False,
               "settings": dict(conf), "rows": rows,
               "load_average_after": common.load_average()}
    common.write_json(out, "dsa", payload)
    (Path(out) / "dsa.md").write_text(summary(payload))
    return payload


def summary(payload: dict[str, Any]) -> str:
    conf = payload["settings"]["config"]
    lines = ["## Sparse latent attention (DSA): decode step versus the index top-k", "",
             f"DeepSeek-V3.2-shaped, 2 layers, hidden {conf['hidden_size']}, {conf['num_attention_heads']} heads, "
             f"d_c {conf['kv_lora_rank']}, d_R {conf['qk_rope_head_dim']}, d_n {conf['qk_nope_head_dim']}, "
             f"d_v {conf['v_head_dim']}, indexer {conf['index_n_heads']} heads x {conf['index_head_dim']}; "
             "batch 1, one new token over the context's cached tokens; "
             "every variant eager (not compiled), one thread. Parts are summed over the layers (forward hooks): "
             "indexer = the family's indexer or the kept selection graph with its cache update; attention = "
             "the rewritten paths' core (gather of the k selected rows, attention, W_UV, o_proj), for the "
             "unmodified model its attention block minus the indexer (projections, expanding every cached "
             "latent, attention over the context masked to k).", ""]
    rows = []
    for r in payload["rows"]:
        for variant in VARIANTS:
            v = r[variant]
            rows.append([r["context"], r["top_k"], variant, common.ms(v["step_s"]), common.ms(v["attention_s"]),
                         common.ms(v["indexer_s"]), r.get(f"{variant}_speedup", 1.0)])
    headers = ["context", "k", "variant", "step ms", "attention ms", "indexer ms", "speedup vs unmodified"]
    lines += [common.markdown_table(headers, rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.part_main("benchmarks.dsa", __doc__, run, summary, argv, compiles=False)


if __name__ == "__main__":
    raise SystemExit(main())

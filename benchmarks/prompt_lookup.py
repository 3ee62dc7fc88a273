"""Prompt-lookup decoding end to end (issue 6): tokens/s of ``generate(..., prompt_lookup_num_tokens=3)`` on a
repetitive prompt against plain greedy ``generate``, for the unmodified model and both rewritten paths
(eager: prompt lookup verifies a varying number of candidate tokens per step, which would recompile an
Inductor graph for each new length). Tokens must be identical across all runs.

    python -m benchmarks.prompt_lookup [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

from typing import Any

import torch

from . import common

PART = "prompt_lookup"
LOOKUP_TOKENS = 3


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shape": "gqla", "pattern": 8, "repeats": 4, "new_tokens": 12, "budget_s": 0.02}
    return {"shape": "gqla", "pattern": 32, "repeats": 16, "new_tokens": 48, "budget_s": 2.0}


def repetitive_prompt(vocab: int, pattern: int, repeats: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, pattern), generator=generator).repeat(1, repeats)


def run(out: str, *, quick: bool = False, pool: common.ModelPool | None = None, **_: Any) -> dict[str, Any]:
    cfg = settings(quick)
    pool = pool or common.ModelPool(quick=quick)
    machine = common.machine_info(pool.device)
    if pool.shapes:
        cfg = {**cfg, "shape": pool.shapes[0]}
    config = pool.config(cfg["shape"]).get_text_config()
    prompt = repetitive_prompt(config.vocab_size, cfg["pattern"], cfg["repeats"]).to(pool.device)
    new = cfg["new_tokens"]
    results, sequences = {}, {}
    for variant in common.VARIANTS:
        model = pool.get(cfg["shape"], variant, False)
        entry = {}
        for mode, extra in (("greedy", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": LOOKUP_TOKENS})):
            def generate(extra=extra):
                with torch.no_grad():
                    return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                          pad_token_id=0, **extra)
            sequences[(variant, mode)] = generate()
            timing = common.time_call(generate, warmup=0, min_repeats=2, max_repeats=10, budget_s=cfg["budget_s"])
            entry[mode] = {"seconds": timing.median, "timing": timing.to_dict(), "tokens_per_s": new / timing.median}
        entry["lookup_speedup"] = common.ratio(entry["greedy"]["seconds"], entry["prompt_lookup"]["seconds"])
        results[variant] = entry
    reference = sequences[("original", "greedy")]
    identical = {f"{v}/{m}": bool(torch.equal(s, reference)) for (v, m), s in sequences.items()}
    for variant, entry in results.items():
        for mode in ("greedy", "prompt_lookup"):
            entry[mode]["speedup_vs_unmodified"] = common.ratio(results["original"][mode]["seconds"],
                                                                entry[mode]["seconds"])
    generated = reference[0, prompt.shape[1]:].tolist()
    payload = {"part": PART, "quick": quick, "settings": cfg, "dtype": str(pool.dtype), "machine": machine,
               "load_average_after": common.load_average(), "prompt_tokens": prompt.shape[1],
               "lookup_tokens": LOOKUP_TOKENS, "results": results, "identical_tokens": identical,
               "all_identical": all(identical.values()),
               "generated_distinct_tokens": len(set(generated))}
    common.write_json(out, PART, payload)
    return payload


def summary(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = ["## Prompt lookup (issue 6)", "",
             f"`{s['shape']}` model, prompt of {payload['prompt_tokens']} tokens ({s['pattern']} tokens repeated "
             f"{s['repeats']} times), {s['new_tokens']} new tokens, `prompt_lookup_num_tokens={payload['lookup_tokens']}`, "
             f"eager. Tokens identical across all runs: **{payload['all_identical']}** (the greedy continuation has "
             f"{payload['generated_distinct_tokens']} distinct tokens).", ""]
    rows = [[common.variant_label(v, False), e["greedy"]["tokens_per_s"], e["prompt_lookup"]["tokens_per_s"],
             e["lookup_speedup"], e["prompt_lookup"]["speedup_vs_unmodified"]] for v, e in payload["results"].items()]
    lines += [common.markdown_table(["variant", "greedy tokens/s", "prompt lookup tokens/s", "lookup speed-up",
                                     "lookup x unmodified"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.part_main("benchmarks.prompt_lookup", __doc__, run, summary, argv, compiles=False)


if __name__ == "__main__":
    raise SystemExit(main())

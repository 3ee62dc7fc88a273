"""Regrouping an MLA model with real weights: does similarity grouping find the heads that belong together?

    python -m benchmarks.regroup_mla            # SmolLM2-135M (cached, see benchmarks/smollm2.py), a few minutes
    python -m benchmarks.regroup_mla --quick    # a tiny random Llama, seconds

SmolLM2-135M is a GQA model (9 query heads, 3 KV heads). It is made into an MLA model exactly:

1. TransGQLA at full rank (``kv_lora_rank = 2 * n_kv * d_h``, ``qk_rope_head_dim = n_kv * d_h``): a GQLA model
   with 3 groups, equal to the source up to rounding;
2. one group per query head: each group's up-projection is copied to its heads, and each head gets its own
   random orthogonal basis for keys and values (folded into its query rows and ``o_proj`` columns, so the model
   is unchanged, but no two heads share an up-projection any more);
3. the heads are shuffled by a fixed random permutation (query rows, ``kv_b_proj`` blocks and ``o_proj`` columns
   together), so that the heads of one original group are no longer neighbours.

It is then regrouped to 3 groups with ``gqla_compile.convert``: similarity grouping should find the original
groups (their keys and values span one subspace), reproduce the model (logit error below 1e-4) and keep its
perplexity; neighbour grouping pools heads of different groups and should not. Held-out perplexity at 1 group
too. Perplexity on held-out Python standard-library sources (``real_text``).

Writes ``regroup_mla.json`` and ``regroup_mla.md`` into ``benchmarks/results`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.convert import environment
from benchmarks.real_text import byte_tokens, perplexity, stdlib_text, windows

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
SEED = 0


def load(quick: bool) -> tuple[Any, Any]:
    """(float32 GQA model, tokenizer or None for byte tokens)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from gqla_compile.checkpoint import load_model
    from gqla_compile.tiny import tiny_llama

    if quick:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            return LlamaForCausalLM(tiny_llama(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)).eval(), None
    from benchmarks.smollm2 import ensure_smollm2

    folder = ensure_smollm2()
    return load_model(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def token_windows(part: str, tokenizer: Any, seq_len: int, count: int) -> torch.Tensor:
    text = stdlib_text(part, max_chars=seq_len * count * 8)
    ids = tokenizer(text)["input_ids"] if tokenizer is not None else byte_tokens(text)
    return windows(ids, seq_len, count)


def _orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def one_group_per_head(gqla: Any, permutation: list[int], seed: int = SEED) -> Any:
    """The GqlaForCausalLM ``gqla`` with n_g = n_h: per-head random key/value bases, heads permuted; exact."""
    config = copy.deepcopy(gqla.config)
    n_h, n_g = config.num_attention_heads, config.num_key_value_heads
    d_n, d_v, d_c, d_r = config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank, config.qk_rope_head_dim
    config.num_key_value_heads = n_h
    generator = torch.Generator().manual_seed(seed)
    perm = torch.tensor(permutation)
    state = {n: t.detach().to(torch.float64).clone() for n, t in gqla.state_dict().items()}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        keys = torch.stack([_orthogonal(d_n, generator) for _ in range(n_h)])  # R_h
        values = torch.stack([_orthogonal(d_v, generator) for _ in range(n_h)])  # S_h
        up = state[prefix + "kv_b_proj.weight"].view(n_g, d_n + d_v, d_c).repeat_interleave(n_h // n_g, dim=0)
        up = torch.cat([keys @ up[:, :d_n], values @ up[:, d_n:]], dim=1)  # (R q).(R k) = q.k; o S^T S v = o v
        state[prefix + "kv_b_proj.weight"] = up[perm].reshape(-1, d_c)
        for name in ("q_proj.weight", "q_proj.bias", "q_b_proj.weight"):
            if prefix + name in state:
                rows = state[prefix + name].reshape(n_h, d_n + d_r, -1)
                rows = torch.cat([keys @ rows[:, :d_n], rows[:, d_n:]], dim=1)
                state[prefix + name] = rows[perm].reshape(state[prefix + name].shape)
        out = state[prefix + "o_proj.weight"]
        heads = out.view(out.shape[0], n_h, d_v).permute(1, 0, 2) @ values.transpose(1, 2)  # [n_h, D, d_v]
        state[prefix + "o_proj.weight"] = heads[perm].permute(1, 0, 2).reshape(out.shape)
    model = type(gqla)(config)
    dtype = next(gqla.parameters()).dtype
    model.load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def relative_error(model: Any, reference: torch.Tensor, batches: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=batches, use_cache=False).logits.double()
    return float((logits - reference).norm() / reference.norm())


def run(quick: bool) -> dict[str, Any]:
    import gqla_compile

    start = time.perf_counter()
    source, tokenizer = load(quick)
    cfg = source.config
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_h = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_h
    calibration = list(token_windows("calibration", tokenizer, 64 if quick else 128, 8 if quick else 16))
    evaluation = token_windows("evaluation", tokenizer, 64 if quick else 128, 4 if quick else 8)
    with torch.no_grad():
        reference = source(input_ids=evaluation, use_cache=False).logits.double()
    original_ppl = perplexity(source, evaluation)
    gqla = gqla_compile.convert(source, kv_lora_rank=2 * n_kv * d_h, qk_rope_head_dim=n_kv * d_h,
                                calibration=calibration, progress=False)
    permutation = torch.randperm(n_h, generator=torch.Generator().manual_seed(SEED)).tolist()
    mla = one_group_per_head(gqla, permutation)
    true_groups = sorted(sorted(j for j in range(n_h) if permutation[j] // (n_h // n_kv) == g) for g in range(n_kv))
    rows = [
        {"model": f"TransGQLA, full rank ({n_kv} groups)", "num_groups": n_kv, "grouping": "-",
         "logit_rel_error": relative_error(gqla, reference, evaluation), "perplexity": perplexity(gqla, evaluation)},
        {"model": f"MLA, one group per head, heads shuffled ({n_h} groups)", "num_groups": n_h, "grouping": "-",
         "logit_rel_error": relative_error(mla, reference, evaluation), "perplexity": perplexity(mla, evaluation)},
    ]
    for num_groups, grouping in ((n_kv, "similarity"), (n_kv, "neighbour"), (1, "neighbour")):
        began = time.perf_counter()
        regrouped = gqla_compile.convert(mla, num_groups=num_groups, grouping=grouping, calibration=calibration,
                                         progress=False, output="gqla")
        seconds = time.perf_counter() - began
        found = [sorted(sorted(g) for g in layer["groups"]) for layer in regrouped.config.conversion["layers"]]
        rows.append({
            "model": f"MLA regrouped to {num_groups}", "num_groups": num_groups, "grouping": grouping,
            "logit_rel_error": relative_error(regrouped, reference, evaluation),
            "perplexity": perplexity(regrouped, evaluation),
            "layers_with_original_groups": sum(groups == true_groups for groups in found) if num_groups == n_kv else None,
            "convert_seconds": seconds,
        })
        logger.info("%s", rows[-1])
    return {
        "benchmark": "regroup_mla", "mode": "quick" if quick else "full",
        "model": {"name": "tiny random Llama" if quick else "SmolLM2-135M-Instruct", "num_attention_heads": n_h,
                  "num_key_value_heads": n_kv, "head_dim": d_h, "num_hidden_layers": cfg.num_hidden_layers},
        "permutation": permutation, "original_groups": true_groups, "original_perplexity": original_ppl,
        "evaluation_tokens": evaluation.numel(), "calibration_tokens": sum(c.numel() for c in calibration),
        "rows": rows, "seconds": time.perf_counter() - start, "environment": environment(),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        f"# Regrouping an MLA model with real weights ({result['mode']}: {m['name']})", "",
        f"{m['name']} ({m['num_attention_heads']} query heads, {m['num_key_value_heads']} KV heads, "
        f"{m['num_hidden_layers']} layers) made into an MLA model exactly (TransGQLA at full rank, one group per "
        f"head with per-head random key/value bases, heads shuffled by the permutation {result['permutation']}; "
        f"the original groups are then {result['original_groups']}), then regrouped with `gqla_compile.convert`. "
        f"Held-out perplexity of the original: {result['original_perplexity']:.4f} on "
        f"{result['evaluation_tokens']} tokens of Python standard-library sources; logit error relative to the "
        f"original. Calibration: {result['calibration_tokens']} held-in tokens. Total {result['seconds']:.0f} s.", "",
        "| model | groups | grouping | layers with the original groups | logit rel. error | perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        found = r.get("layers_with_original_groups")
        found = "-" if found is None else f"{found} / {m['num_hidden_layers']}"
        lines.append(f"| {r['model']} | {r['num_groups']} | {r['grouping']} | {found} | "
                     f"{r['logit_rel_error']:.2e} | {r['perplexity']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama only (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for regroup_mla.json / regroup_mla.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(SEED)
    result = run(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regroup_mla.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "regroup_mla.md").write_text(markdown(result))
    logger.info("wrote %s", args.out / "regroup_mla.json")
    return result


if __name__ == "__main__":
    main()

"""``gqla-compile demo``: the whole flow on a tiny random Llama, in well under a minute on a laptop CPU.

TransGQLA conversion (full rank: lossless; compressed: lossy), then the same GQLA model optimized for two
targets whose rooflines make the cost model pick different paths, greedy generation checked token for
token against the unoptimized converted model, and each optimization's report.
"""

from __future__ import annotations

import argparse
import copy
import time

# (target, s_q): H100 at s_q = 1 and H20 at s_q = 2, the paper's two cases (DESIGN.md section 1).
TARGETS = (("h100", 1), ("h20", 2))
# tiny-llama with 16 query heads over its 2 KV heads: enough heads per group that the absorbed path's
# arithmetic intensity (about 2 n_h s_q FLOP per cached element) crosses the H20's ridge at s_q = 2.
LLAMA_OVERRIDES = dict(num_attention_heads=16, head_dim=16)
NEW_TOKENS = 8


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="convert a tiny Llama to GQLA, optimize it for two targets, generate and report",
        description="Build a tiny random Llama, convert it with TransGQLA (full rank, lossless; and a "
        "compressed rank), optimize copies for h100 (s_q=1) and h20 (s_q=2), check that greedy generation "
        "gives the unoptimized model's tokens, and print each report. Eager by default (seconds).",
    )
    parser.add_argument("--quiet", dest="demo_quiet", action="store_true",
                        help="print only the one-line summary")
    parser.add_argument("--compile", action="store_true", help="compile the rewritten models with Inductor (slow)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch

    quiet = args.demo_quiet or getattr(args, "quiet", False)

    def say(text: str = "") -> None:
        if not quiet:
            print(text)

    start = time.perf_counter()
    config, llama, calibration, probe, prompt = _tiny_llama()
    say(f"tiny Llama: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} "
        f"query heads, {config.num_key_value_heads} KV heads x {config.head_dim} dims (random weights, seed 0)")
    converted, errors = _convert_two_ranks(llama, calibration, probe, say)
    gqla = converted["full rank"]
    with torch.no_grad():
        expected = gqla.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
    results = [_optimize_and_generate(gqla, target, s_q, prompt, expected, compile=args.compile, say=say)
               for target, s_q in TARGETS]
    ok = all(same for *_, same in results) and errors["full rank"] < 1e-4
    paths = ", ".join(f"{t} s_q={s}: {p}" for t, s, p, _ in results)
    print(f"demo {'OK' if ok else 'FAILED'}: conversion error full rank {errors['full rank']:.1e}, compressed "
          f"{errors['compressed']:.1e}; {paths}; tokens "
          f"{'identical' if all(s for *_, s in results) else 'DIFFER'}; {time.perf_counter() - start:.1f} s")
    if not ok:
        raise RuntimeError("the demo's checks failed (see above)")


def _tiny_llama():
    """The tiny random Llama (seed 0) and its calibration sequences, logit probe and prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..tiny import TINY_CONFIGS

    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = TINY_CONFIGS["tiny-llama"](**LLAMA_OVERRIDES)
        llama = AutoModelForCausalLM.from_config(config).eval()
        generator = torch.Generator().manual_seed(0)
        calibration = [torch.randint(0, config.vocab_size, (64,), generator=generator) for _ in range(16)]
        probe = torch.randint(0, config.vocab_size, (2, 24), generator=generator)
        prompt = torch.randint(0, config.vocab_size, (1, 6), generator=generator)
    return config, llama, calibration, probe, prompt


def _convert_two_ranks(llama, calibration, probe, say):
    """TransGQLA at full rank (lossless) and compressed; each model and its logit error on the probe."""
    import torch

    import gqla_compile
    from ..verification import relative_error

    n_kv, head_dim = llama.config.num_key_value_heads, llama.config.head_dim
    ranks = {"full rank": (2 * n_kv * head_dim, n_kv * head_dim), "compressed": (n_kv * head_dim // 2, 8)}
    converted, errors = {}, {}
    with torch.no_grad():
        reference = llama(probe).logits
        for label, (d_c, d_r) in ranks.items():
            model = gqla_compile.convert(llama, kv_lora_rank=d_c, qk_rope_head_dim=d_r, calibration=calibration,
                                         progress=False)
            converted[label] = model
            errors[label] = relative_error(model(probe).logits, reference)
            say(f"TransGQLA {label:10s} d_c={d_c:3d} d_R={d_r:2d}: cache {d_c + d_r} vs {2 * n_kv * head_dim} "
                f"elements per token and layer, logit relative error {errors[label]:.2e}")
    return converted, errors


def _optimize_and_generate(gqla, target: str, s_q: int, prompt, expected, *, compile: bool, say):
    """A copy optimized for ``target``: its path, and whether greedy generation gives the expected tokens; says
    so, with the report."""
    import torch

    import gqla_compile

    model = gqla_compile.optimize(copy.deepcopy(gqla), target=target, s_q=s_q, compile=compile)
    state = model.gqla_optimization
    with torch.no_grad():
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=0)
    same = torch.equal(tokens, expected)
    say()
    say(f"== {target}, s_q={s_q}: {state.path} path; {state.plan.reason}")
    say(f"   generated {tokens[0, prompt.shape[1]:].tolist()}: "
        f"{'identical to' if same else 'DIFFERENT from'} the unoptimized model's tokens")
    say()
    say(str(gqla_compile.report(model)))
    return target, s_q, state.path, same

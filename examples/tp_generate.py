"""Tensor-parallel decoding of a GQLA model: every rank holds only its share of the attention and its cache.

    torchrun --nproc-per-node 2 examples/tp_generate.py                    # CPU: gloo
    torchrun --nproc-per-node 2 examples/tp_generate.py --path absorbed    # GPUs: nccl, one device per rank

Each rank builds the same tiny random GQLA model (same seed), ``gqla_compile.optimize(..., tp=world size)``
shards its attention (grouped path: the rank's latent groups; absorbed path: its query heads, with the
whole latent cached on every rank), and all ranks generate together (an all-reduce after each o_proj).
Rank 0 prints the tokens, checks them against the unsharded model, and lists every rank's cache bytes.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.distributed import init_from_env
from gqla_compile.tiny import tiny_gqla


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=("auto", "absorbed", "grouped"), default="grouped")
    parser.add_argument("--target", default="h20")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="hand the sharded graphs to Inductor")
    args = parser.parse_args()

    rank, world = init_from_env()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same weights on every rank
    config = tiny_gqla(num_attention_heads=8, num_key_value_heads=4)
    reference = AutoModelForCausalLM.from_config(config).eval().to(device)
    model = gqla_compile.optimize(copy.deepcopy(reference), target=args.target, path=args.path, tp=world,
                                  compile=args.compile)
    state = model.gqla_optimization

    prompt = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = model.generate(prompt, **kwargs)
    expected = reference.generate(prompt, **kwargs).sequences

    mine = torch.tensor([cache_bytes(out.cache)], device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        layer = state.layers[0]
        per_token = layer.cache_elements_per_rank * reference.dtype.itemsize
        print(f"{world} ranks ({dist.get_backend()}), {state.path} path on {state.target.name}")
        print("tokens:", out.sequences[0].tolist())
        print("same as the unsharded model:", torch.equal(out.sequences, expected))
        for r, b in enumerate(every):
            print(f"rank {r}: cache {int(b.item())} bytes ({per_token} bytes per token and layer)")
        whole = layer.cache_elements_after * reference.dtype.itemsize
        print(f"unsharded cache: {whole} bytes per token and layer; not sharded: "
              + ", ".join(k for k, v in state.tp_sharding.items() if v.startswith("replicated")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

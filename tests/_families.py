"""Every MLA family of the installed transformers, discovered at test time and built tiny from its own config.

A family is a ``transformers/models/<name>/modeling_<name>.py`` that holds ``kv_a_proj_with_mqa`` (the name
all of transformers' MLA implementations give the latent down-projection). Nothing here lists families by
hand: each is built from its own config class by one generic shrinking function (``tiny_config``):

- sizes by field name (hidden 64, 4 heads, d_c 16, d_n 8, d_R 4, d_v 6, few experts, small indexer top-k);
- per-layer lists (``layer_types``, ``mlp_layer_types``, ``indexer_types``, ``no_rope_layers``...) keep few
  layers that together show every value of every list (greedy cover, in order), so a hybrid family keeps one
  linear-attention layer next to one latent-attention layer, a MoE family one dense and one sparse layer;
- vision/audio sub-configs are shrunk the same way and the model is run text-only;
- ``attention_bias`` on; after building, random non-zero biases and norm gains (seeded), float32.

``FAMILIES`` maps family name -> ``Family`` (the config and model classes); ``UNSUPPORTED`` names the families
the detector cannot rewrite completely, with the cause (the tests mark them ``xfail(strict=True)``).
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import torch
import transformers

VOCAB = 160  # token ids used as input are drawn below TEXT_VOCAB; special tokens live above it
TEXT_VOCAB = 128
HEADS = 4

# field name -> tiny value (applied to every config and sub-config that has the field with a number in it)
_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 48,
    "ffn_hidden_size": 48,
    "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "shared_experts_intermediate_size": 32,
    "projection_intermediate_size": 32,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "num_heads": HEADS,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "n_routed_experts": 4,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "zero_expert_num": 2,
    "n_group": 1,
    "num_expert_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0,
    "index_n_heads": 2,
    "index_head_dim": 8,
    "index_topk": 4,
    "index_kpool": 2,
    "linear_num_heads": 2,
    "linear_head_dim": 8,
    "layer_group_size": 2,
    "depth": 1,
    "gated_norm_rank": 4,
    "out_hidden_size": 64,
    "adapter_out_dim": 64,
    "vocab_size": VOCAB,
}
_LAYER_COUNTS = ("num_hidden_layers", "num_layers")
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config")


@dataclass(frozen=True)
class Family:
    """One MLA family: its name (the transformers models/ folder), config class and causal-LM class."""

    name: str
    config_class: type
    model_class: type

    def __str__(self) -> str:
        return self.name


def discover_families() -> dict[str, Family]:
    """Every ``models/*/modeling_*.py`` of the installed transformers that holds ``kv_a_proj_with_mqa``, and
    every model type that ships a config only and is served by one of those families' causal-LM classes
    (transformers' Auto mapping: sarvam_mla's config runs DeepseekV3ForCausalLM)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.dirname(transformers.__file__)
    families = {}
    for path in sorted(glob.glob(os.path.join(root, "models", "*", "modeling_*.py"))):
        with open(path, encoding="utf-8") as handle:
            if "kv_a_proj_with_mqa" not in handle.read():
                continue
        name = os.path.basename(os.path.dirname(path))
        modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        model_class = _causal_lm_class(modeling)
        families[name] = Family(name, model_class.config_class, model_class)
    by_class = {family.model_class.__name__: family.model_class for family in families.values()}
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if model_type not in families and class_name in by_class and model_type in CONFIG_MAPPING:
            families[model_type] = Family(model_type, CONFIG_MAPPING[model_type], by_class[class_name])
    return families


def _causal_lm_class(modeling) -> type:
    """The family's text generator: ``*ForCausalLM`` whose config is the top-level one, else ``*ForConditionalGeneration``."""
    own = [getattr(modeling, n) for n in dir(modeling) if getattr(getattr(modeling, n), "__module__", "") == modeling.__name__]
    for suffix in ("ForCausalLM", "ForConditionalGeneration"):
        found = [c for c in own if isinstance(c, type) and c.__name__.endswith(suffix)]
        top = [c for c in found if not getattr(c.config_class, "base_config_key", "")]
        if top or found:
            return (top or found)[0]
    raise LookupError(f"{modeling.__name__} has no causal LM class")


def _shrink(values: dict, text_hidden: int) -> dict:
    """Tiny values for one config's fields (not its sub-configs)."""
    out = dict(values)
    old = {k: values.get(k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim")}
    for key, tiny in _SIZES.items():
        if isinstance(values.get(key), int) and not isinstance(values.get(key), bool) and values[key] != 0:
            out[key] = tiny  # (a 0 stays: e.g. no RoPE dims at all)
    if values.get("num_experts_per_tok", 0) is None:  # a MoE config that leaves top-k to the checkpoint
        out["num_experts_per_tok"] = _SIZES["num_experts_per_tok"]
    if "out_hidden_size" in values and text_hidden:
        out["out_hidden_size"] = text_hidden
    if "qk_rope_head_dim" in values:
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
        # head_dim names one of the head sizes (the RoPE dims in most families): keep naming the same one
        if isinstance(values.get("head_dim"), int):
            same = [k for k, v in old.items() if v == values["head_dim"]]
            out["head_dim"] = out[same[0]] if same else out["qk_head_dim"]
    elif isinstance(values.get("head_dim"), int):
        out["head_dim"] = 16
    for key, value in values.items():
        if (key.endswith("token_id") or key.endswith("token_index")) and isinstance(value, int) and value >= TEXT_VOCAB:
            out[key] = TEXT_VOCAB + value % (VOCAB - TEXT_VOCAB)
        if key.endswith("token_id") and isinstance(value, list):
            out[key] = [TEXT_VOCAB + v % (VOCAB - TEXT_VOCAB) for v in value]
    if "attention_bias" in values:
        out["attention_bias"] = True
    _shrink_layers(values, out)
    rope = values.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and "qk_rope_head_dim" in out:
        out["rope_parameters"] = {**rope, "mrope_section": _split(out["qk_rope_head_dim"] // 2, rope["mrope_section"])}
    return out


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split into len(parts) positive ints in proportion to ``parts``."""
    sizes = [max(1, math.floor(total * p / sum(parts))) for p in parts]
    sizes[0] += total - sum(sizes)
    return sizes


def _shrink_layers(values: dict, out: dict) -> None:
    """Keep the layers that show each value of the per-layer lists at least once (at least two layers)."""
    key = next((k for k in _LAYER_COUNTS if isinstance(values.get(k), int)), None)
    if key is None:
        return
    count = values[key]
    per_layer = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == count and count > 1}
    # dicts keyed by layer index (per-layer overrides of sizes): shrunk, renumbered with the kept layers
    by_index = {k: v for k, v in values.items() if isinstance(v, dict) and v
                and all(str(i).isdigit() and isinstance(s, dict) for i, s in v.items())}
    def pairs(layer: int) -> set:
        found = {(k, str(v[layer])) for k, v in per_layer.items() if v != list(range(count))}
        return found | {(k, str({int(i): s for i, s in v.items()}.get(layer))) for k, v in by_index.items()}

    kept, seen = [], set()
    while True:  # greedy cover: the layer showing most (list, value) pairs no kept layer shows, earliest first
        layer = max(range(count), key=lambda i: (len(pairs(i) - seen), -i))
        if not pairs(layer) - seen:
            break
        seen |= pairs(layer)
        kept.append(layer)
    while len(kept) < 2:
        kept.append(next(i for i in range(count) if i not in kept))
    kept.sort()
    out[key] = len(kept)
    for name, value in per_layer.items():
        out[name] = list(range(len(kept))) if value == list(range(count)) else [value[i] for i in kept]
    for name, value in by_index.items():
        overrides = {int(i): s for i, s in value.items()}
        out[name] = {f"{new:02d}": _shrink(overrides[old], 0) for new, old in enumerate(kept) if old in overrides}
    if "first_k_dense_replace" in values and "mlp_layer_types" not in per_layer:
        out["first_k_dense_replace"] = 1


def tiny_config(family: Family):
    """The family's config, shrunk (see the module docstring)."""
    base = family.config_class()
    values = base.to_dict()
    text_hidden = _SIZES["hidden_size"]
    kwargs = _shrink({k: v for k, v in values.items() if k not in _SUB_CONFIGS}, text_hidden)
    for sub in _SUB_CONFIGS:
        if isinstance(values.get(sub), dict):
            kwargs[sub] = _shrink(values[sub], text_hidden)
    for drop in ("transformers_version", "architectures", "_name_or_path", "model_type", "output_attentions"):
        kwargs.pop(drop, None)
    config = family.config_class(**kwargs)
    config._attn_implementation = "eager"
    return config


def randomize_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero gains on every norm weight and random non-zero biases (so no identity hides a bug)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "rotary" in name or "inv_freq" in name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif leaf == "bias" or leaf.endswith("_bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


def tiny_model(family: Family, seed: int = 0) -> torch.nn.Module:
    """The family's model, tiny, float32, random weights (``seed``), random norm gains and biases, eval mode."""
    torch.manual_seed(seed)
    model = family.model_class(tiny_config(family)).to(torch.float32).eval()
    return randomize_norms_and_biases(model, seed)


@functools.lru_cache(maxsize=None)
def shared_tiny_model(name: str) -> torch.nn.Module:
    """``tiny_model`` of a family, built once per test session and shared by the test files (never modify it:
    deep-copy before ``optimize``)."""
    return tiny_model(FAMILIES[name])


def text_inputs(batch: int = 2, seq: int = 12, seed: int = 3) -> torch.Tensor:
    """Token ids below TEXT_VOCAB (no image / audio / special tokens)."""
    return torch.randint(0, TEXT_VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


_LOAD_AND_RUN = textwrap.dedent("""
    import json, sys
    import torch, transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    folders, tokens = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
    torch.set_num_threads(int(sys.argv[3]))  # the caller's, so that the logits can be bit-identical
    for folder in folders:
        config = AutoConfig.from_pretrained(folder)
        if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        else:  # families transformers does not list for AutoModelForCausalLM load by their own class
            model = getattr(transformers, config.architectures[0]).from_pretrained(
                folder, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            torch.save(model.eval()(input_ids=tokens, use_cache=False).logits, folder + "/logits.pt")
    assert not any(name.startswith("gqla_compile") for name in sys.modules), "gqla_compile was imported"
""")


def logits_in_stock_transformers(folders: list[str], tokens: torch.Tensor, cwd) -> dict[str, torch.Tensor]:
    """Each saved folder loaded by stock transformers (AutoModelForCausalLM, eager attention) in a fresh
    process that never imports gqla_compile, run on ``tokens``: folder -> logits."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, json.dumps([str(f) for f in folders]),
                    json.dumps(tokens.tolist()), str(torch.get_num_threads())], check=True, env=env, cwd=cwd, timeout=600)
    return {folder: torch.load(os.path.join(folder, "logits.pt")) for folder in folders}


FAMILIES: dict[str, Family] = discover_families()

#: Families whose latent attention ``optimize`` and ``convert`` cannot rewrite completely today, with the cause
#: (README.md's family table lists the same). Every other discovered family must be rewritten.
UNSUPPORTED: dict[str, str] = {}
PER_CHANNEL_GATE = ("its output gate multiplies each value channel (one sigmoid per value dim), which the per-group "
                     "value basis regrouping writes does not follow: convert refuses it (ConversionError naming the "
                     "block; test_regrouping_refuses_a_per_channel_output_gate)")
#: Families ``convert`` cannot regroup (a superset of UNSUPPORTED; tests/test_regroup_families.py).
UNSUPPORTED_REGROUP: dict[str, str] = {
    **UNSUPPORTED,
    "axk2": PER_CHANNEL_GATE,
    "hy_v4": PER_CHANNEL_GATE,
    "hy_v4_vl": PER_CHANNEL_GATE,
}

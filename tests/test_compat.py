"""The helpers that let the package run on the transformers vLLM pins (5.16.1 on) as on the newest."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqla_compile import compat
from gqla_compile.tiny import tiny_gqla


@pytest.mark.parametrize("keep", [0, 1, 3, torch.tensor([0, 2, 5]), torch.tensor([[1, 4], [0, 6]]),
                                  torch.rand(2, 7, generator=torch.Generator().manual_seed(0)) > 0.5],
                         ids=["all", "last", "last three", "positions", "per sample", "mask"])
def test_the_own_slice_equals_transformers(keep):
    from transformers.modeling_utils import slice_logits_to_keep

    hidden = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(compat.keep_positions(hidden, keep), slice_logits_to_keep(hidden, keep))


def test_the_cache_goes_by_either_name_and_comes_back_under_transformers_field():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_gqla()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = model(input_ids=ids[:, :8], use_cache=True)
        cache = getattr(first, compat.CACHE_FIELD)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old_name = model(input_ids=ids[:, 8:], past_key_values=cache, use_cache=True)
        whole = model(input_ids=ids)
    assert cache.get_seq_length() == 9  # the old keyword reached the cache
    torch.testing.assert_close(old_name.logits[:, -1], whole.logits[:, -1], rtol=1e-5, atol=1e-5)
    deprecated = [w for w in caught if "past_key_values" in str(w.message)]
    assert bool(deprecated) == (compat.CACHE_FIELD == "cache")  # warned only where cache is the new name

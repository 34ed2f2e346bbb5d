"""The transformers details tidal relies on (tidal_compile/hf_compat.py), checked against the
installed release: when a release moves one of them, these tests say which."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaForCausalLM, StaticCache

from tidal_compile import TidalCache, hf_compat
from models import CACHE, prompts, tiny_model


def forward(model, tokens, cache, start):
    positions = torch.arange(start, start + tokens.shape[1])[None]
    with torch.no_grad():
        model(input_ids=tokens, position_ids=positions, use_cache=True, **{CACHE: cache})


def test_the_forward_takes_its_cache_under_a_known_name():
    parameters = inspect.signature(LlamaForCausalLM.forward).parameters
    assert CACHE in parameters and CACHE in hf_compat.CACHE_ARGUMENTS, (
        f"LlamaForCausalLM.forward takes none of {hf_compat.CACHE_ARGUMENTS}: {list(parameters)}")


@pytest.mark.parametrize("cache_class", [StaticCache, TidalCache])
def test_a_static_cache_writes_at_its_own_length_and_rewinds(cache_class):
    """Allocation on the first write, writes at get_seq_length(), and `rewind` makes the next
    forward rewrite the last entries (what KV-cache correction does)."""
    model = tiny_model("llama", layers=2)
    cache = cache_class(config=model.config, max_cache_len=12)
    assert not hf_compat.is_allocated(cache) and hf_compat.max_length(cache) == 12
    prompt, _ = prompts(1, 7, False)
    forward(model, prompt[:, :5], cache, 0)
    assert hf_compat.is_allocated(cache)
    assert int(cache.get_seq_length()) == 5 and int(hf_compat.written_end(cache.layers[0])) == 5
    keys = cache.layers[1].keys.clone()
    assert keys[:, :, :5].abs().sum() > 0 and keys[:, :, 5:].abs().sum() == 0, "written at positions 0..4"
    hf_compat.rewind(cache, 2)
    assert int(cache.get_seq_length()) == 3
    forward(model, prompt[:, 5:7], cache, 3)  # other tokens at positions 3, 4
    assert int(cache.get_seq_length()) == 5
    rewritten = cache.layers[1].keys
    assert torch.equal(rewritten[:, :, :3], keys[:, :, :3]) and not torch.equal(rewritten[:, :, 3:5], keys[:, :, 3:5])
    assert rewritten[:, :, 5:].abs().sum() == 0


def test_call_arguments_name_positional_arguments_by_signature():
    names = hf_compat.positional_names(inspect.signature(LlamaForCausalLM.forward))
    assert names[:2] == ("input_ids", "attention_mask") and "self" not in names
    tokens, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    call = hf_compat.call_arguments(names, (tokens, mask), {"use_cache": True})
    assert call["input_ids"] is tokens and call["attention_mask"] is mask and call["use_cache"]
    with pytest.raises(TypeError, match="several values for argument 'input_ids'"):
        hf_compat.call_arguments(names, (tokens,), {"input_ids": tokens})
    assert hf_compat.cache_argument({"past_key_values": 1}) == "past_key_values"
    assert hf_compat.cache_argument({"cache": 1}) == "cache"
    assert hf_compat.cache_argument({"cache": None}) is None


def test_the_attention_implementation_is_read_from_the_config():
    assert hf_compat.attention_implementation(tiny_model("llama", layers=1).config) == "sdpa"
    eager = tiny_model("llama", layers=1, attn_implementation="eager")
    assert hf_compat.attention_implementation(eager.config) == "eager"

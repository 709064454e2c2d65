"""The cache's name on the installed transformers, and the absence of deprecation warnings."""

import logging
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers.compat import CACHE_KEY, cache_kwargs, output_cache, take_cache


def test_cache_key_follows_the_installed_release():
    renamed = Version(transformers.__version__) >= Version("5.24")
    assert CACHE_KEY == ("cache" if renamed else "past_key_values")


def test_take_cache_accepts_either_name_once():
    assert take_cache({"cache": 1, "x": 2}) == 1
    assert take_cache({"past_key_values": 3}) == 3
    kwargs = {"cache": None, "past_key_values": None, "x": 2}
    assert take_cache(kwargs) is None and kwargs == {"x": 2}
    with pytest.raises(ValueError, match="not both"):
        take_cache({"cache": 1, "past_key_values": 1})


def test_a_llama_decodes_through_the_helpers_without_deprecation_warnings(caplog):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    llama = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (1, 9))
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("error")
        with torch.no_grad():
            full = llama(ids).logits
            out = llama(ids[:, :5], use_cache=True)
            pieces = [out.logits]
            for t in range(5, 9):
                out = llama(ids[:, t : t + 1], use_cache=True, **cache_kwargs(output_cache(out)))
                pieces.append(out.logits)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5

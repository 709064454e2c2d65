"""Transplanting TTT layers into a Llama: weight copy, swap and restore, imitation, bad input."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers.compat import CACHE_KEY, cache_kwargs, output_cache
from ttt_helpers.transplant import (
    TTTAsAttention,
    imitate,
    match_scale,
    record_attention,
    transplant,
    ttt_from_attention,
)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def test_weights_copied_with_grouped_heads(llama):
    attn = llama.model.layers[1].self_attn
    layer = ttt_from_attention(attn, init="attention")
    assert torch.equal(layer.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(layer.o_proj.weight, attn.o_proj.weight)
    k = layer.k_proj.weight.view(4, 8, 32)  # 4 query heads of 8
    k_ref = attn.k_proj.weight.view(2, 8, 32)  # 2 key/value heads
    for h in range(4):
        assert torch.equal(k[h], k_ref[h // 2])  # query heads 0,1 share kv head 0; 2,3 share 1
    random = ttt_from_attention(attn, init="random")
    assert not torch.equal(random.q_proj.weight, attn.q_proj.weight)


def test_transplant_swaps_and_restores(llama, rng):
    ids = torch.randint(0, 64, (2, 20), generator=rng)
    with torch.no_grad():
        before = llama(ids, use_cache=False).logits
    layer = ttt_from_attention(llama.model.layers[1].self_attn)
    removed = transplant(llama, {1: layer})
    assert isinstance(llama.model.layers[1].self_attn, TTTAsAttention)
    with torch.no_grad():
        during = llama(ids).logits  # a full forward with the default cache works
    assert not torch.allclose(during, before)
    transplant(llama, removed)
    with torch.no_grad():
        assert torch.equal(llama(ids, use_cache=False).logits, before)


def test_decoding_with_a_kv_cache_is_refused(llama):
    transplant(llama, {0: ttt_from_attention(llama.model.layers[0].self_attn)})
    with torch.no_grad():
        cache = output_cache(llama(torch.randint(0, 64, (1, 5)), use_cache=True))
        with pytest.raises(ValueError, match=CACHE_KEY):
            llama(torch.randint(0, 64, (1, 1)), **cache_kwargs(cache))


def test_record_match_scale_and_imitate(llama, rng):
    ids = torch.randint(0, 64, (6, 16), generator=rng)
    records = record_attention(llama, [0, 2], ids)
    inputs, targets = records[2]
    assert inputs.shape == targets.shape == (6, 16, 32)
    layer = ttt_from_attention(llama.model.layers[2].self_attn, mini_batch_size=4)
    match_scale(layer, inputs, targets)
    with torch.no_grad():
        rms = layer(inputs)[0].pow(2).mean().sqrt()
    assert torch.allclose(rms, targets.pow(2).mean().sqrt(), rtol=1e-4)
    losses = imitate(layer, inputs, targets, steps=40, lr=3e-3)
    assert len(losses) == 40 and sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_bad_input(llama):
    attn = llama.model.layers[0].self_attn
    with pytest.raises(ValueError, match="init"):
        ttt_from_attention(attn, init="zeros")
    with pytest.raises(ValueError, match="layer_indices"):
        transplant(llama, {3: ttt_from_attention(attn)})
    with pytest.raises(ValueError, match="layer_indices"):
        record_attention(llama, [], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="steps"):
        imitate(ttt_from_attention(attn), torch.zeros(1, 4, 32), torch.ones(1, 4, 32), steps=0)
    with pytest.raises(ValueError, match="model"):
        transplant(torch.nn.Linear(2, 2), {0: ttt_from_attention(attn)})

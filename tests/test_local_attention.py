"""LocalAttention (sinks and a window, StreamingLLM positions) and the hybrid TTT layer built on it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers.compat import output_cache
from ttt_helpers.local_attention import LocalAttention, llama_rope, llama_rope_table
from ttt_helpers.model.convert import from_llama
from ttt_helpers.pretrained import sink_window_mask

F64 = torch.float64


def streaming_reference(q, k, v, window: int, sinks: int, theta: float):
    """Token by token, as StreamingLLM runs: the cache keeps the first `sinks` tokens and the last
    `window`, and each kept key is rotated at its slot in the cache, the query at the last slot."""
    B, H, T, D = q.shape
    out = torch.empty_like(v)
    for t in range(T):
        kept = [j for j in range(t + 1) if j < sinks or t - j < window]
        slots = torch.arange(len(kept))
        keys = llama_rope(k[:, :, kept], llama_rope_table(slots, D, theta))
        query = llama_rope(q[:, :, t : t + 1], llama_rope_table(slots[-1:], D, theta))
        p = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(D), dim=-1)
        out[:, :, t : t + 1] = p @ v[:, :, kept]
    return out


@pytest.mark.parametrize("window, sinks, T", [(4, 2, 23), (8, 0, 19), (5, 3, 5), (16, 4, 40), (1, 1, 7)])
def test_local_attention_matches_a_streaming_cache_token_by_token(window, sinks, T, rng):
    q, k, v = (torch.randn(2, 3, T, 8, generator=rng, dtype=F64) for _ in range(3))
    attention = LocalAttention(window, sinks, 8, 10000.0)
    out, _ = attention(q, k, v, 0)
    # the rotary angles are float32 (as Llama's), and a key turns by another angle here (its own
    # position, the query's) than there (slots): equal up to float32's rounding of the angles
    torch.testing.assert_close(out, streaming_reference(q, k, v, window, sinks, 10000.0), rtol=0, atol=2e-6)


@pytest.mark.parametrize("cuts", [(1, 2, 3), (5,), (7, 8, 20), tuple(range(1, 30))])
def test_local_attention_continued_from_its_cache_is_one_call(cuts, rng):
    T, window, sinks = 30, 6, 3
    q, k, v = (torch.randn(1, 2, T, 8, generator=rng, dtype=F64) for _ in range(3))
    attention = LocalAttention(window, sinks, 8, 500.0)
    whole, whole_cache = attention(q, k, v, 0)
    pieces, cache, edges = [], None, [0, *cuts, T]
    for a, b in zip(edges, edges[1:]):
        y, cache = attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], a, cache)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(cache, whole_cache):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert cache[0].shape == (1, 2, window, 8) and cache[2].shape == (1, 2, sinks, 8)


def test_local_attention_refuses_a_continuation_without_its_cache():
    attention = LocalAttention(4, 1, 8, 10000.0)
    x = torch.zeros(1, 1, 2, 8)
    with pytest.raises(ValueError, match="start is 3"):
        attention(x, x, x, 3)
    with pytest.raises(ValueError, match="window"):
        LocalAttention(0, 1, 8, 10000.0)
    with pytest.raises(ValueError, match="head_dim must be even"):
        LocalAttention(4, 1, 7, 10000.0)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000.0, tie_word_embeddings=True,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).double().eval()


def test_converted_hybrid_is_the_llama_with_sinks_and_a_window_before_training(tiny_llama, rng):
    """Before the TTT branch is trained (its output norm at zero) the hybrid is the Llama whose
    attention sees the first 2 tokens and the last 8 (where the cache's positions are absolute)."""
    window, sinks = 8, 2
    hybrid = from_llama(tiny_llama, attention_window=window, attention_sinks=sinks).double()
    hybrid.set_ttt_impl("reference")
    T = window + sinks
    ids = torch.randint(0, 97, (2, T), generator=rng)
    mask = sink_window_mask(T, window, sinks).to(F64).expand(2, 1, T, T)
    want = tiny_llama(ids, attention_mask=mask).logits
    # transformers' eager attention rounds its softmax to float32: agreement to float32's precision
    torch.testing.assert_close(hybrid(ids).logits, want, rtol=0, atol=1e-6)


def test_hybrid_generates_at_constant_memory_and_continues_as_one_call(tiny_llama, rng):
    hybrid = from_llama(tiny_llama, attention_window=4, attention_sinks=1).double()
    hybrid.set_ttt_impl("reference")
    with torch.no_grad():  # a live TTT branch
        for block in hybrid.model.layers:
            block.ttt.post_norm.weight.normal_(0, 0.3, generator=rng)
    ids = torch.randint(0, 97, (1, 45), generator=rng)
    whole = hybrid(ids).logits
    out = hybrid(ids[:, :21], use_cache=True)
    cache = output_cache(out)
    size = cache.nbytes()
    pieces = [out.logits]
    for t in range(21, 45):
        pieces.append(hybrid(ids[:, t : t + 1], cache=cache).logits)
        assert cache.nbytes() == size
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-10, atol=1e-10)


def test_hybrid_refuses_padding(tiny_llama):
    hybrid = from_llama(tiny_llama, attention_window=4, attention_sinks=1)
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded batches"):
        hybrid(ids, attention_mask=mask)


def test_hybrid_decodes_from_device_counters_as_from_host_ones(tiny_llama, rng):
    """With the cache's positions and token count on the device (what a CUDA graph replays), each
    decoded token gives what the host-side path gives, and the counters follow."""
    hybrid = from_llama(tiny_llama, attention_window=4, attention_sinks=2).double()
    hybrid.set_ttt_impl("reference")
    with torch.no_grad():
        for block in hybrid.model.layers:
            block.ttt.post_norm.weight.normal_(0, 0.3, generator=rng)
    ids = torch.randint(0, 97, (2, 30), generator=rng)
    host = output_cache(hybrid(ids[:, :1], use_cache=True))
    device = output_cache(hybrid(ids[:, :1], use_cache=True))
    device.keep_positions(hybrid.config.mini_batch_size)
    for t in range(1, 30):
        want = hybrid(ids[:, t : t + 1], cache=host).logits
        got = hybrid(ids[:, t : t + 1], cache=device).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert device.tokens.tolist() == [30] and device.positions.tolist() == [30 % 16] * 2
    attention = LocalAttention(4, 2, 8, 10000.0)
    x = torch.zeros(1, 1, 2, 8)
    with pytest.raises(ValueError, match="one token"):
        attention(x, x, x, torch.tensor([3]), attention.initial_cache(x[0, :, 0, 0], 1))

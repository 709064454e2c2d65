"""benchmarks.ttt_smollm2's Transformer paths on a tiny random Llama: the chunked prefill gives the
hidden states of one full forward, and the greedy loop over its cache says what generate() says, for
the Llama and for its sliding-window copy (a window shorter than a chunk)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers.pretrained import sliding_window


@pytest.fixture(scope="module")
def bench():
    from benchmarks import ttt_smollm2

    return ttt_smollm2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("window", [None, 100])
def test_chunked_prefill_and_greedy_loop_match_one_forward(bench, window):
    llama = tiny_llama()
    model = llama if window is None else sliding_window(llama, window)
    ids = torch.randint(0, 300, (2, 700), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.model(input_ids=ids, use_cache=False).last_hidden_state
        chunked, _ = bench.prefill(model, ids, tokens=512)  # three chunks of 256 per row
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
        said = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=5, eos_token_id=5
        )[:, ids.shape[1] :]
    assert torch.equal(bench.greedy_llama(model, ids, 8, eos=5), said)


def test_window_changes_what_the_model_sees(bench):
    llama = tiny_llama()
    ids = torch.randint(0, 300, (1, 400), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = bench.prefill(llama, ids, tokens=256)[0]
        windowed = bench.prefill(sliding_window(llama, 100), ids, tokens=256)[0]
    torch.testing.assert_close(windowed[:, :100], full[:, :100], rtol=1e-5, atol=1e-5)
    assert (windowed[:, 300:] - full[:, 300:]).abs().max() > 1e-3


def test_static_cache_decode_says_what_generate_says():
    """The decode baseline's loop (static cache, prompt read in chunks, eager here) gives generate()'s
    tokens, also when one decoder reads a second prompt."""
    from benchmarks.kernel_bench.model import LlamaGraphDecoder, graph_decode_rate, llama_graph_decode

    llama = tiny_llama()
    gen = torch.Generator().manual_seed(3)
    first, second = (torch.randint(0, 300, (2, 300), generator=gen) for _ in range(2))

    def said(ids):
        with torch.no_grad():
            out = llama.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=5
            )
        return out[:, ids.shape[1] :]

    out = llama_graph_decode(llama, first, steps=5, warmup=2, chunk=128, mode=None)
    assert out["tokens"].shape == (2, 8) and out["tokens_per_s"] > 0
    assert torch.equal(out["tokens"], said(first))
    decoder = LlamaGraphDecoder(llama, 320, mode=None, chunk=100)
    for ids in (first, second, first):
        assert torch.equal(graph_decode_rate(decoder, ids, steps=5, warmup=2)["tokens"], said(ids))
    with pytest.raises(ValueError, match="steps"):
        llama_graph_decode(llama, first, steps=0)
    with pytest.raises(ValueError, match="no room"):
        LlamaGraphDecoder(llama, 300, mode=None).read(first)


def test_reuse_takes_only_what_the_delta_does_not_change(bench):
    provenance = {"teacher_sha256": "t", "bank": {"b": 1}}
    other = {
        "provenance": {**provenance, "delta_sha256": "old"},
        "perplexity": {
            "tokens": 2048,
            "documents": {
                "a": {"domain": "plays", "ids_sha256": "x", "smollm2": 1.0, "converted": 2.0, "ttt": 3.0},
                "b": {"domain": "code", "ids_sha256": "y", "smollm2": 4.0, "ttt": 5.0},
            },
        },
        "passkey": {"lengths": [1024], "depths": [0.5], "trials": 20, "cells": {"1024@0.5": {"smollm2": 1, "ttt": 0}}},
        "chat": {"Hi?": {"smollm2": "Hello.", "ttt": "#"}},
    }
    results = {
        "provenance": {**provenance, "delta_sha256": "new"},
        "perplexity": {"tokens": 2048, "documents": {"b": {"domain": "code", "ids_sha256": "other tokens"}}},
    }
    copied = bench.reuse_base_models(results, other)
    docs = results["perplexity"]["documents"]
    assert docs["a"] == {"domain": "plays", "ids_sha256": "x", "smollm2": 1.0, "converted": 2.0}
    assert docs["b"] == {"domain": "code", "ids_sha256": "other tokens"}  # other tokens: nothing taken
    assert results["passkey"]["cells"] == {"1024@0.5": {"smollm2": 1}}
    assert results["chat"] == {"Hi?": {"smollm2": "Hello."}}
    assert copied == {"perplexity": 2, "passkey": 1, "chat": 1}
    assert results["provenance"]["reused"]["delta_sha256"] == "old"
    with pytest.raises(ValueError, match="teacher_sha256"):
        bench.reuse_base_models({"provenance": {**provenance, "teacher_sha256": "u"}}, other)


def test_sink_window_mask_is_causal_attention_with_sinks_and_a_window():
    from ttt_helpers.pretrained import sink_window_mask

    seen = sink_window_mask(8, window=3, sinks=2)[0, 0] == 0
    assert seen[7].tolist() == [True, True, False, False, False, True, True, True]
    assert seen[2].tolist() == [True, True, True] + [False] * 5
    llama = tiny_llama()
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = llama(ids).logits
        whole = llama(ids, attention_mask=sink_window_mask(50, window=50, sinks=0)).logits
        windowed = llama(ids, attention_mask=sink_window_mask(50, window=8, sinks=0)).logits
        reference = sliding_window(llama, 8)(ids).logits
    torch.testing.assert_close(whole, plain, rtol=1e-5, atol=1e-5)  # a window as long as the text: causal
    torch.testing.assert_close(windowed, reference, rtol=1e-5, atol=1e-5)  # no sinks: the sliding window
    with pytest.raises(ValueError, match="window"):
        sink_window_mask(8, window=0)

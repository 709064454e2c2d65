"""TTTForCausalLM: presets, generate(), prefill/decode agreement, save/load, bad config."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ttt_helpers.model import TTT_STANDARD_CONFIGS, TTTCache, TTTConfig, TTTForCausalLM

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_model(gen, **overrides) -> TTTForCausalLM:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = TTTForCausalLM(TTTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # move every parameter off its initial value so all of them matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# paper's nominal sizes; ours differ by the vocabulary (32k) and tied embeddings, see chapter 4
@pytest.mark.parametrize("name,millions", [("125m", 110.3), ("350m", 337.3), ("760m", 733.0), ("1b", 1284.9)])
def test_presets_instantiate(name, millions):
    with torch.device("meta"):
        model = TTTForCausalLM(TTTConfig(**TTT_STANDARD_CONFIGS[name]))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_auto_classes():
    config = AutoConfig.for_model("ttt", **TINY)
    assert isinstance(config, TTTConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), TTTForCausalLM)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("T,k", [(37, 10), (45, 16), (21, 1)])
def test_prefill_then_decode_equals_one_forward(layer_type, backbone, T, k, rng):
    model = tiny_model(rng, ttt_layer_type=layer_type, backbone=backbone)
    ids = torch.randint(0, 97, (2, T), generator=rng)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :k], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        size = cache.nbytes()
        for t in range(k, T):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert cache.seen_tokens == T and cache.nbytes() == size  # the state does not grow
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-4


def test_generate_greedy_and_sampling(rng):
    model = tiny_model(rng, eos_token_id=None)  # no early stop: every row runs its 12 tokens
    prompt = torch.randint(0, 97, (2, 7), generator=rng)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    seq = prompt
    with torch.no_grad():  # greedy by hand, without a cache
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    torch.manual_seed(0)
    sampled = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=True, top_k=20, pad_token_id=0
    )
    assert sampled.shape == (2, 19) and torch.equal(sampled[:, :7], prompt)


def test_save_load_round_trip_is_bitwise(rng, tmp_path):
    model = tiny_model(rng, ttt_layer_type="mlp", backbone="mamba")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, TTTForCausalLM)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 97, (1, 20), generator=rng)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_labels_give_the_shifted_cross_entropy(rng):
    model = tiny_model(rng)
    ids = torch.randint(0, 97, (2, 19), generator=rng)
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.model.layers[0].ttt.W0.grad is not None


def test_cache_detach_cuts_the_graph(rng):
    model = tiny_model(rng).train()
    ids = torch.randint(0, 97, (1, 16), generator=rng)
    cache = model(ids, use_cache=True).past_key_values
    assert isinstance(cache, TTTCache) and cache.states[0][0].requires_grad
    detached = cache.detach()
    assert not detached.states[0][0].requires_grad and detached.seen_tokens == 16


def test_padding_is_refused(rng):
    model = tiny_model(rng)
    ids = torch.randint(0, 97, (2, 5), generator=rng)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mini_batch_size=0), "mini_batch_size"),
        (dict(ttt_layer_type="conv"), "ttt_layer_type"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(backbone="rnn"), "backbone"),
        (dict(ttt_base_lr=-1.0), "ttt_base_lr"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TTTConfig(**{**TINY, **kwargs})

"""TTTForCausalLM: presets, generate(), prefill/decode agreement, save/load, bad config."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ttt_helpers.compat import CACHE_KEY, cache_kwargs, output_cache
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


def test_default_config_is_the_1b_preset_and_backbones_map_onto_the_options():
    assert TTTConfig() == TTTConfig(**TTT_STANDARD_CONFIGS["1b"])
    c = TTTConfig()
    assert (c.rope_theta, c.mini_batch_size, c.ttt_base_lr, c.conv_kernel) == (10000.0, 16, 1.0, 4)
    assert (c.pre_conv, c.share_qk, c.use_gate, c.backbone) == (False, False, False, "transformer")
    m = TTTConfig(**TINY, backbone="mamba")
    assert (m.pre_conv, m.share_qk, m.use_gate) == (True, True, True)
    assert TTTConfig(**TINY, pre_conv=True, share_qk=True, use_gate=True).backbone == "mamba"
    assert TTTConfig(**TINY, pre_conv=True).backbone == "custom"
    assert TTTConfig(**TINY, scan_checkpoint_group_size=4, max_position_embeddings=8192).scan_checkpoint_group_size == 4
    reloaded = TTTConfig.from_dict(TTTConfig(**TINY, share_qk=True).to_dict())
    assert (reloaded.backbone, reloaded.share_qk, reloaded.pre_conv) == ("custom", True, False)


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
        cache, pieces = output_cache(out), [out.logits]
        size = cache.nbytes()
        for t in range(k, T):
            pieces.append(model(ids[:, t : t + 1], **cache_kwargs(cache)).logits)
    assert cache.seen_tokens == T and cache.nbytes() == size  # the state does not grow
    # nor does the memory it keeps alive: no cached tensor is a view into a buffer as long as the prompt
    tensors = [t for s in cache.states for t in s] + [c for c in cache.conv_states if c is not None]
    assert all(t.untyped_storage().nbytes() <= t.numel() * t.element_size() for t in tensors)
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_streaming_any_split_is_exact_in_float64(layer_type, backbone, rng):
    """Pieces that end inside a mini-batch and continue with several tokens, then single tokens:
    the logits of one forward, in float64, through the convolution states and RoPE positions."""
    model = tiny_model(rng, ttt_layer_type=layer_type, backbone=backbone).double()
    ids = torch.randint(0, 97, (2, 50), generator=rng)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, pieces, start = None, [], 0
        for size in (5, 14, 3, 16, 1, 1, 10):
            out = model(ids[:, start : start + size], use_cache=True, **cache_kwargs(cache))
            cache, start = output_cache(out), start + size
            pieces.append(out.logits)
    err = (torch.cat(pieces, 1) - full).abs().max().item()
    assert start == 50 and err < 1e-12, f"seed {rng.initial_seed()}: {err:.2e}"


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
    cache = output_cache(model(ids, use_cache=True))
    assert isinstance(cache, TTTCache) and cache.states[0][0].requires_grad
    detached = cache.detach()
    assert not detached.states[0][0].requires_grad and detached.seen_tokens == 16


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [1, L_i] as one left-padded batch: (ids [B, T] with 0 as padding, attention_mask)."""
    T = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - r.shape[1] :], mask[i, T - r.shape[1] :] = r[0], 1
    return ids, mask


@pytest.mark.parametrize("layer_type,backbone", [("linear", "transformer"), ("linear", "mamba"), ("mlp", "mamba")])
def test_left_padded_generate_gives_each_row_its_own_continuation(layer_type, backbone, rng):
    """Prompts of 37, 6, 23 and 16 tokens (their mini-batch positions all differ) in one left-padded
    batch: 25 greedy tokens per row identical to the row alone, every step's logits within 1e-5."""
    model = tiny_model(rng, ttt_layer_type=layer_type, backbone=backbone, eos_token_id=None)
    rows = [torch.randint(1, 97, (1, n), generator=rng) for n in (37, 6, 23, 16)]
    ids, mask = left_padded(rows)
    kw = dict(max_new_tokens=25, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for i, row in enumerate(rows):
        alone = model.generate(row, attention_mask=torch.ones_like(row), **kw)
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, row.shape[1] :]), f"row {i}"
        worst = max((a[i] - b[0]).abs().max().item() for a, b in zip(batch.logits, alone.logits))
        assert worst < 1e-5, f"row {i}: {worst}"


def test_left_padded_forward_and_cache_match_the_rows_alone(rng):
    model = tiny_model(rng, backbone="mamba")
    rows = [torch.randint(1, 97, (1, n), generator=rng) for n in (19, 3, 19)]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = output_cache(out)
        assert cache.starts == [0, 16, 0] and cache.seen_tokens == 19
        assert torch.equal(out.logits[1, :16], torch.zeros_like(out.logits[1, :16]))  # padding
        nxt = torch.randint(1, 97, (3, 2), generator=rng)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache).logits
        assert cache.seen_tokens == 21
        for i, row in enumerate(rows):
            alone = model(row, use_cache=True)
            n = row.shape[1]
            assert (out.logits[i, -n:] - alone.logits[0]).abs().max().item() < 1e-5
            cont = model(nxt[i : i + 1], cache=output_cache(alone)).logits
            assert (step[i] - cont[0]).abs().max().item() < 1e-5, f"row {i}"
        no_cache = model(ids, attention_mask=mask, use_cache=False).logits  # the whole-sequence path: rounding apart
        assert (no_cache - out.logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("layer_type,backbone", [("linear", "transformer"), ("linear", "mamba"), ("mlp", "mamba")])
def test_left_padded_prompt_runs_in_one_call_and_leaves_each_row_its_own_state(layer_type, backbone, rng):
    """Prompts of 37, 6, 23, 16, 32 and 1 tokens (six paddings, whole mini-batches 0 to 2, rests 0 to
    7) run through the model once; in float64 every logit and every tensor of the cache (TTT states,
    gradient sums, convolution states) is the row's alone to 1e-10, and the positions follow."""
    model = tiny_model(rng, ttt_layer_type=layer_type, backbone=backbone).double()
    lengths = (37, 6, 23, 16, 32, 1)
    rows = [torch.randint(1, 97, (1, n), generator=rng) for n in lengths]
    ids, mask = left_padded(rows)
    calls = []
    hook = model.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert calls == [len(rows)], "the whole padded prompt in one call"
        cache = output_cache(out)
        assert cache.seen_tokens == 37 and cache.starts == [37 - n for n in lengths]
        for i, row in enumerate(rows):
            alone = model(row, use_cache=True)
            n, own = row.shape[1], output_cache(alone)
            assert (out.logits[i, -n:] - alone.logits[0]).abs().max().item() < 1e-10, f"row {i}"
            assert not out.logits[i, : 37 - n].any()  # padding
            tensors = [(s[i], a[0]) for l, m in zip(cache.states, own.states) for s, a in zip(l, m)]
            tensors += [(c[i], a[0]) for c, a in zip(cache.conv_states, own.conv_states) if c is not None]
            assert max((got - want).abs().max().item() for got, want in tensors) < 1e-10, f"row {i}"
    hook.remove()
    assert cache.row_positions(16) == [n % 16 for n in lengths]


def test_left_padded_decode_runs_every_row_in_one_call_at_its_own_position(rng):
    """After a left-padded prompt, each decoded token runs the model once for all rows (no groups),
    each row at its own position in its mini-batch, kept on the device in `cache.positions`;
    a longer continuation (in groups) keeps those positions right; every logit as the row alone."""
    model = tiny_model(rng, backbone="mamba", eos_token_id=None)
    b = model.config.mini_batch_size
    rows = [torch.randint(1, 97, (1, n), generator=rng) for n in (37, 6, 23, 16)]
    ids, mask = left_padded(rows)
    calls = []
    hook = model.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
        alone = [output_cache(model(r, use_cache=True)) for r in rows]
        del calls[:]
        for t in range(40):
            nxt = torch.randint(1, 97, (4, 3 if t == 20 else 1), generator=rng)  # one longer call at t = 20
            full = torch.ones(4, cache.seen_tokens + nxt.shape[1], dtype=torch.long)
            full[:, : ids.shape[1]] = mask
            got = model(nxt, attention_mask=full, cache=cache).logits
            if nxt.shape[1] == 1:
                assert calls[-1] == 4, "a decoded token runs every row in one call"
            assert cache.positions.tolist() == cache.row_positions(b)
            for i, c in enumerate(alone):
                want = model(nxt[i : i + 1], cache=c).logits
                assert (got[i] - want[0]).abs().max().item() < 1e-5, f"step {t}, row {i}"
    hook.remove()
    assert len(set(cache.row_positions(b))) == 4  # the rows really sit at four different positions


def test_padding_other_than_a_prompts_left_padding_is_refused(rng):
    model = tiny_model(rng)
    ids = torch.randint(1, 97, (2, 5), generator=rng)
    right = torch.ones_like(ids)
    right[0, -1] = 0
    empty = torch.ones_like(ids)
    empty[1] = 0
    left = torch.ones_like(ids)
    left[1, :2] = 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="attention_mask must pad on the left"):
            model(ids, attention_mask=right)
        with pytest.raises(ValueError, match="at least one token"):
            model(ids, attention_mask=empty)
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            model(ids, attention_mask=left[:, :3])
        with pytest.raises(ValueError, match="labels"):
            model(ids, attention_mask=left, labels=ids)
        cache = output_cache(model(ids, use_cache=True))  # read without padding
        with pytest.raises(ValueError, match="not the cache's"):
            model(ids[:, :1], attention_mask=torch.cat([left, torch.ones_like(ids[:, :1])], 1), cache=cache)
        with pytest.raises(ValueError, match="only the prompt"):
            model(ids[:, :1], attention_mask=torch.zeros_like(ids[:, :1]), cache=cache)
        ragged = output_cache(model(ids, attention_mask=left, use_cache=True))
        with pytest.raises(ValueError, match="no padding"):
            model(ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), cache=ragged)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mini_batch_size=0), "mini_batch_size"),
        (dict(ttt_layer_type="conv"), "ttt_layer_type"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(backbone="rnn"), "backbone"),
        (dict(ttt_base_lr=-1.0), "ttt_base_lr"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(scan_checkpoint_group_size=-1), "scan_checkpoint_group_size"),
        (dict(backbone="transformer", pre_conv=True), "pre_conv"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TTTConfig(**{**TINY, **kwargs})


def count_tokens_read(model: TTTForCausalLM) -> list[int]:
    """A list that records the number of tokens of every forward through `model`."""
    reads: list[int] = []
    model.model.register_forward_pre_hook(lambda module, args: reads.append(args[0].shape[1]))
    return reads


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_generate_reads_each_token_once(layer_type, rng):
    """generate() reuses the TTTCache: after the prompt, every forward reads only the new token."""
    model = tiny_model(rng, ttt_layer_type=layer_type, eos_token_id=None)
    reads = count_tokens_read(model)
    prompt = torch.randint(1, 97, (2, 37), generator=rng)  # no 0: generate would infer it is padding
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 43)
    assert reads == [37, 1, 1, 1, 1, 1]  # the last token is returned, never read


def test_generate_continues_a_cache_it_is_given(rng):
    model = tiny_model(rng, eos_token_id=None)
    prompt = torch.randint(1, 97, (1, 20), generator=rng)
    with torch.no_grad():
        cache = output_cache(model(prompt[:, :12], use_cache=True))
    reads = count_tokens_read(model)
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert reads == [8, 1, 1] and cache.seen_tokens == 22
    assert torch.equal(out, model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_forward_takes_the_cache_under_either_name(rng):
    model = tiny_model(rng)
    ids = torch.randint(0, 97, (1, 9), generator=rng)
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        assert CACHE_KEY in out and isinstance(output_cache(out), TTTCache)
        a = model(ids[:, 5:], cache=output_cache(out).detach()).logits
        b = model(ids[:, 5:], past_key_values=output_cache(out).detach()).logits
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, 5:], cache=output_cache(out), past_key_values=output_cache(out))


def test_pipeline_batches_left_padded_prompts(rng):
    """A text-generation pipeline pads a batch of prompts on the left: each gets what it gets alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    model = tiny_model(rng, eos_token_id=None)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", padding_side="left")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21", "w9"]
    batched = generator(prompts, batch_size=2, max_new_tokens=6, do_sample=False)
    alone = [generator(p, max_new_tokens=6, do_sample=False) for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == [a[0]["generated_text"] for a in alone]


@pytest.mark.parametrize(
    "make_cache,error,match",
    [
        (lambda m: m.model.new_cache(1), ValueError, "rows"),  # a 1-row cache for a 2-row input
        (lambda m: m.model.new_cache(3), ValueError, "rows"),
        (lambda m: __import__("transformers").DynamicCache(), TypeError, "TTTCache"),
        (lambda m: TTTCache(m.model.new_cache(2).states[:1], [None]), ValueError, "layers"),
    ],
)
def test_a_wrong_cache_is_refused(make_cache, error, match, rng):
    model = tiny_model(rng)
    cache = make_cache(model)
    with pytest.raises(error, match=match):
        model(torch.randint(0, 97, (2, 3), generator=rng), **cache_kwargs(cache))


def test_empty_or_non_integer_input_is_refused(rng):
    model = tiny_model(rng)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))


def interrupt_layer(model: TTTForCausalLM, i: int, after: int = 0) -> list[int]:
    """Make block i raise a KeyboardInterrupt at its call number `after` (counting from 0) and
    later ones until the returned switch (a one-element list) is set to 0."""
    state = [1, after]

    def hook(module, args):
        state[1] -= 1
        if state[0] and state[1] < 0:
            raise KeyboardInterrupt

    model.model.layers[i].register_forward_pre_hook(hook)
    return state


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("new", [5, 1])
def test_a_call_that_fails_leaves_the_cache_as_it_was(backbone, new, rng):
    """An interrupt inside layer 1 while reading `new` more tokens after 7: layer 0's states and
    the token count are as before, and the next call gives what it gives without the failure."""
    model = tiny_model(rng, backbone=backbone).double()
    ids = torch.randint(0, 97, (2, 7 + new), generator=rng)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits[:, 7:]
        cache = output_cache(model(ids[:, :7], use_cache=True))
        before = (
            [[t.clone() for t in s] for s in cache.states],
            [None if c is None else c.clone() for c in cache.conv_states],
        )
        switch = interrupt_layer(model, 1)
        with pytest.raises(KeyboardInterrupt):
            model(ids[:, 7:], **cache_kwargs(cache))
        switch[0] = 0
        for s, old in zip(cache.states, before[0]):
            assert all(torch.equal(a, b) for a, b in zip(s, old))
        for c, old in zip(cache.conv_states, before[1]):
            assert c is old is None or torch.equal(c, old)
        assert cache.seen_tokens == 7 and cache.broken is None
        got = model(ids[:, 7:], **cache_kwargs(cache)).logits
    assert (got - want).abs().max().item() < 1e-12


def test_a_failed_step_that_may_have_updated_states_in_place_marks_the_cache_unusable(rng):
    """The decode kernel (impl "kernel"; on the CPU through Triton's interpreter) updates the states in
    place: after a failure there the cache cannot be put back, and the next call says so."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(rng, hidden_size=64, ttt_impl="kernel").to(device)
    ids = torch.randint(0, 97, (1, 4), generator=rng).to(device)
    with torch.no_grad():
        cache = output_cache(model(ids[:, :3], use_cache=True))
        switch = interrupt_layer(model, 1)
        with pytest.raises(KeyboardInterrupt):
            model(ids[:, 3:], **cache_kwargs(cache))
        switch[0] = 0
        assert cache.broken is not None
        with pytest.raises(ValueError, match="cache is unusable: a call on it failed \\(KeyboardInterrupt\\)"):
            model(ids[:, 3:], **cache_kwargs(cache))


def same_state(a: TTTCache, b: TTTCache) -> bool:
    tensors = [(x, y) for s, t in zip(a.states, b.states) for x, y in zip(s, t)]
    convs = [(x, y) for x, y in zip(a.conv_states, b.conv_states) if x is not None]
    return a.seen_tokens == b.seen_tokens and all(torch.equal(x, y) for x, y in tensors + convs)


def test_a_chat_turn_that_is_interrupted_leaves_the_conversation_as_it_was(rng):
    """Chat.turn (stream_generate) interrupted while reading its third token: the cache holds
    what was read before, as a turn that stopped there would have left it."""
    from ttt_helpers.inference.generate import Chat

    model = tiny_model(rng, vocab_size=128, backbone="mamba").double()  # bytes < 128: one piece per token
    chat, twin = Chat(model, temperature=0.0), Chat(model, temperature=0.0)
    chat.turn("hello", 4, echo=False)
    twin.turn("hello", 4, echo=False)
    switch = interrupt_layer(model, 1, after=3)  # the prompt, two tokens, then the third fails
    with pytest.raises(KeyboardInterrupt):
        chat.turn("more", 6, echo=False)
    switch[0] = 0
    twin.turn("more", 2, echo=False)  # reads the prompt and the same two tokens
    assert same_state(chat.cache, twin.cache) and chat.cache.broken is None
    assert chat.turn("!", 5, echo=False) == twin.turn("!", 5, echo=False)


def test_stopping_stream_generate_early_keeps_the_last_token_it_yielded(rng):
    from ttt_helpers.inference.generate import new_cache, stream_generate

    model = tiny_model(rng, vocab_size=128).double()  # bytes < 128: one piece per token
    cache, whole = new_cache(model), new_cache(model)
    stream = stream_generate(model, None, "abc", 10, cache, temperature=0.0)
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert "".join(stream_generate(model, None, "abc", 3, whole, temperature=0.0)) == "".join(pieces)
    assert cache.seen_tokens == 6 and same_state(cache, whole)  # the prompt and every token yielded


def test_a_float64_model_holds_the_same_exact_token_idx_table_however_it_was_made(rng, tmp_path):
    """1/(1..b) rounded once in the model's dtype: a model cast with .double() holds the table that
    saving and loading, or converting to the authors' layout and back, make again, so their logits
    are bitwise equal."""
    from ttt_helpers.model.convert import from_official, to_official

    model = tiny_model(rng, ttt_layer_type="linear").double()
    exact = 1.0 / torch.arange(1, 17, dtype=torch.float64)
    assert all(torch.equal(b.ttt.token_idx_base, exact) for b in model.model.layers)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    converted = from_official(*to_official(model)).eval()
    ids = torch.randint(0, 97, (2, 37), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want) and torch.equal(converted(ids).logits, want)
    model.float()  # and back: the float32 table it started with
    assert all(torch.equal(b.ttt.token_idx_base, exact.float()) for b in model.model.layers)


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(hidden_size=64), r"layer 0's state has shapes \[\(2, 4, 16, 16\)"),
        (dict(num_attention_heads=2), r"layer 0's state has shapes \[\(2, 2, 16, 16\)"),
        (dict(ttt_layer_type="mlp"), r"layer 0's state has shapes \[\(2, 4, 8, 32\)"),
        (dict(backbone="mamba"), r"layer 0's state has shapes .*\(2, 3, 32\)\]"),
        (dict(pre_conv=True), r"layer 0's convolution state has shape \[2, 3, 32\], the model's None"),
    ],
    ids=["width", "heads", "kind", "backbone", "pre_conv"],
)
def test_a_cache_of_another_model_names_what_differs(other, match, rng):
    model, stranger = tiny_model(rng), tiny_model(rng, **other)
    cache = stranger.model.new_cache(2)
    with pytest.raises(ValueError, match="cache does not fit this model: " + match):
        model(torch.randint(0, 97, (2, 3), generator=rng), **cache_kwargs(cache))

"""LoRA test-time adaptation: training, chunking, unloading to the exact base, bad input."""

import math

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from ttt_helpers.adapt import (
    activation_bytes,
    adapt_lora,
    adapted,
    adapter_gradient,
    answer_nll,
    chunk_batches,
    greedy_answer,
    linear_module_names,
    weights_checksum,
)
from ttt_helpers.data import decode_bytes, encode_bytes

hf_logging.set_verbosity_error()
HIDDEN, HEADS, KV_HEADS, LAYERS = 32, 4, 2, 2


class ByteTokenizer:
    """The smallest tokenizer a test needs: UTF-8 bytes as ids 0..255."""

    pad_token_id = None
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": encode_bytes(text).tolist()}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return decode_bytes(ids)


@pytest.fixture
def tiny(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    # a wide initialisation: with the default 0.02 the random model barely reacts to its adapters
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tok():
    return ByteTokenizer()


def random_text(rng, n: int) -> str:
    return "".join(chr(c) for c in torch.randint(97, 123, (n,), generator=rng).tolist())


def lora_names(model):
    return [name for name, _ in model.named_modules() if "lora_" in name]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loss_decreases_and_only_lora_trains(tiny, tok, rng):
    text = random_text(rng, 12) * 4
    result = adapt_lora(tiny, tok, text, steps=25, lr=1e-2, rank=4)
    assert len(result.losses) == 25 and result.chunks == 1
    assert all(math.isfinite(x) for x in result.losses)
    # over 60 seeds the last loss was at most 0.49 of the first (median 0.41; 0.54 once in CI)
    assert result.losses[-1] < 0.75 * result.losses[0], f"seed {rng.initial_seed()}: {result.losses}"
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # rank 4 on q_proj (32 -> 32) and v_proj (32 -> 2 KV heads * 8 = 16) in each layer: r * (in + out)
    assert result.trainable_params == LAYERS * 4 * ((HIDDEN + HIDDEN) + (HIDDEN + KV_HEADS * HIDDEN // HEADS))
    assert result.total_params == sum(p.numel() for p in tiny.parameters())
    assert 0 < result.trainable_percent < 100 and result.seconds > 0
    assert not result.model.training


def test_same_seed_same_losses_and_copies_equal_one_row(tiny, tok, rng):
    text = random_text(rng, 20)
    runs = []
    for rows, seed in ((text, 3), (text, 3), ([text] * 3, 3), (text, 4)):
        with adapted(tiny, tok, rows, steps=5, lr=1e-2, seed=seed) as result:
            runs.append(torch.tensor(result.losses))
    assert torch.equal(runs[0], runs[1])
    assert torch.allclose(runs[0], runs[2], rtol=1e-4, atol=0)  # identical rows: the same mean gradient
    assert not torch.allclose(runs[0], runs[3], rtol=1e-4, atol=0)  # another seed, another LoRA init


def test_callback_sees_each_step_and_changes_nothing(tiny, tok, rng):
    """The callback runs after every step, in eval mode without gradients, and a run with it has
    the losses of a run without it; the first k steps of a long run are a k-step run."""
    text, seen = random_text(rng, 20), []
    ids = torch.tensor([tok(text)["input_ids"]])

    def probe(step, model):
        seen.append((step, model.training, torch.is_grad_enabled(), model(input_ids=ids, labels=ids).loss))

    with adapted(tiny, tok, text, steps=6, lr=1e-2, seed=1, callback=probe) as long_run:
        long_losses = long_run.losses
    with adapted(tiny, tok, text, steps=3, lr=1e-2, seed=1) as short_run:
        with torch.no_grad():
            short_loss_after = short_run.model(input_ids=ids, labels=ids).loss
    assert [s for s, *_ in seen] == [1, 2, 3, 4, 5, 6]
    assert not any(training or grad for _, training, grad, _ in seen)
    with adapted(tiny, tok, text, steps=6, lr=1e-2, seed=1) as plain:
        assert plain.losses == long_losses
    assert torch.equal(seen[2][3], short_loss_after)


def test_callback_error_removes_the_adapter(tiny, tok, rng):
    before = weights_checksum(tiny)

    def stop(step, model):
        if step == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        adapt_lora(tiny, tok, random_text(rng, 20), steps=4, lr=1e-2, callback=stop)
    assert not lora_names(tiny) and weights_checksum(tiny) == before


def test_adapted_restores_the_exact_base(tiny, tok, rng):
    tiny.train()
    tiny.model.layers[0].eval()  # a mixed pattern of modes, restored module by module
    tiny.model.norm.weight.requires_grad_(False)
    before, modes = weights_checksum(tiny), {n: m.training for n, m in tiny.named_modules()}
    grads = {n: p.requires_grad for n, p in tiny.named_parameters()}
    ids = torch.randint(0, 256, (2, 10), generator=rng)
    base_logits = logits(tiny, ids)
    with adapted(tiny, tok, random_text(rng, 30), steps=5, lr=1e-2) as result:
        assert lora_names(tiny)
        assert not torch.allclose(logits(result.model, ids), base_logits)
        with result.model.disable_adapter():
            assert torch.equal(logits(result.model, ids), base_logits)
    assert type(tiny) is LlamaForCausalLM and not lora_names(tiny) and not hasattr(tiny, "peft_config")
    assert weights_checksum(tiny) == before
    assert {n: m.training for n, m in tiny.named_modules()} == modes
    assert {n: p.requires_grad for n, p in tiny.named_parameters()} == grads
    assert torch.equal(logits(tiny, ids), base_logits)


def test_result_unload_returns_the_same_base(tiny, tok, rng):
    before = weights_checksum(tiny)
    result = adapt_lora(tiny, tok, random_text(rng, 30), steps=3, lr=1e-2)
    assert result.model.base_model.model is tiny and lora_names(tiny)
    assert result.unload() is tiny
    assert not lora_names(tiny) and weights_checksum(tiny) == before and not tiny.training
    assert result.unload() is tiny and weights_checksum(tiny) == before  # a second call changes nothing


def test_adapted_unloads_when_the_body_raises(tiny, tok, rng):
    before = weights_checksum(tiny)
    with pytest.raises(RuntimeError, match="inside the block"):
        with adapted(tiny, tok, random_text(rng, 30), steps=3, lr=1e-2):
            assert lora_names(tiny)
            raise RuntimeError("inside the block")
    assert not lora_names(tiny) and weights_checksum(tiny) == before
    assert all(p.requires_grad for p in tiny.parameters()) and not tiny.training
    with adapted(tiny, tok, random_text(rng, 30), steps=2):  # and the model can be adapted again
        pass


def test_failure_during_training_leaves_no_adapter(tiny, tok, rng):
    before = weights_checksum(tiny)
    calls = []

    def fail_on_third_forward(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = tiny.model.embed_tokens.register_forward_pre_hook(fail_on_third_forward)
    with pytest.raises(KeyboardInterrupt):
        adapt_lora(tiny, tok, random_text(rng, 30), steps=5, lr=1e-2)
    handle.remove()
    assert not lora_names(tiny) and weights_checksum(tiny) == before
    assert all(p.requires_grad for p in tiny.parameters())


def test_chunks_are_learned_in_order(tiny, tok, rng):
    text = random_text(rng, 50)
    ids = encode_bytes(text)
    seen = []
    tiny.model.embed_tokens.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    result = adapt_lora(tiny, tok, text, steps=3, lr=1e-2, chunk_tokens=16)
    # 50 tokens in chunks of 16: 16, 16, 16 and a last chunk of 2
    chunks = [ids[0:16], ids[16:32], ids[32:48], ids[48:50]]
    assert result.chunks == 4 and len(result.losses) == 3 * 4
    assert len(seen) == 12
    for i, batch in enumerate(seen):
        assert torch.equal(batch, chunks[i // 3][None])


def test_default_chunks_are_the_context_window(tiny, tok, rng):
    result = adapt_lora(tiny, tok, random_text(rng, 64 + 20), steps=1)  # max_position_embeddings = 64
    assert result.chunks == 2 and len(result.losses) == 2


def test_chunk_batches_pad_and_mask_rows():
    rows = [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 4, 4, 4, 4, 4]]
    batches = chunk_batches(rows, chunk_tokens=4)
    first, second = batches
    assert torch.equal(first["input_ids"], torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0], [4, 4, 4, 4]]))
    assert torch.equal(first["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert first["labels"][1, 3] == -100 and torch.equal(first["labels"][0], first["input_ids"][0])
    # second chunks: row 0 has a single token left (no target) and is dropped, row 1 has none
    assert torch.equal(second["input_ids"], torch.tensor([[4, 4, 4]]))


def test_rows_of_different_lengths_train(tiny, tok, rng):
    rows = [random_text(rng, 8), random_text(rng, 19), random_text(rng, 13)]
    result = adapt_lora(tiny, tok, rows, steps=10, lr=1e-2)
    assert result.chunks == 1 and len(result.losses) == 10
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]


def test_greedy_answer_is_the_argmax_continuation(tiny, tok, rng):
    """By hand: append the argmax token, up to 5 times, stopping after the model's end-of-sequence id."""
    prompt = random_text(rng, 7)
    ids = encode_bytes(prompt)[None]
    for _ in range(5):
        next_id = logits(tiny, ids)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if next_id == tiny.generation_config.eos_token_id:
            break
    assert greedy_answer(tiny, tok, prompt, max_new_tokens=5) == decode_bytes(ids[0, 7:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_answer(tiny, tok, prompt, max_new_tokens=0)


def test_answer_nll_is_the_loss_on_the_answer_tokens(tiny, tok, rng):
    prompt, answer = random_text(rng, 9), random_text(rng, 4)
    ids = encode_bytes(prompt + answer)[None]
    labels = ids.clone()
    labels[0, :9] = -100  # score only the answer
    with torch.no_grad():
        expected = tiny(input_ids=ids, labels=labels).loss.item()
    assert answer_nll(tiny, tok, prompt, answer) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="answer"):
        answer_nll(tiny, tok, prompt, "")


def test_weights_checksum_sees_one_ulp(tiny):
    before = weights_checksum(tiny)
    w = tiny.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[3, 4] = torch.nextafter(w[3, 4], torch.tensor(math.inf))
    assert weights_checksum(tiny) != before


def test_linear_module_names(tiny):
    assert linear_module_names(tiny) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text": ""}, "text must be a non-empty string"),
        ({"text": []}, "text must be a non-empty string or a non-empty list"),
        ({"text": ["fine", "  "]}, r"text\[1\] must be a non-empty string"),
        ({"text": "a"}, "at least 2 tokens"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"rank": 0}, "rank must be >= 1, got 0"),
        (
            {"target_modules": ["q_proj", "attn"]},
            r"target_modules must be .*'q_proj'.*'v_proj'.*got \['q_proj', 'attn'\]",
        ),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"chunk_tokens": 1}, "chunk_tokens must be >= 2, got 1"),
        ({"alpha": 0}, "alpha must be > 0, got 0"),
    ],
)
def test_bad_input(tiny, tok, kwargs, match):
    args = {"text": "some text to learn", **kwargs}
    before = weights_checksum(tiny)
    with pytest.raises(ValueError, match=match):
        adapt_lora(tiny, tok, args.pop("text"), **args)
    assert not lora_names(tiny) and weights_checksum(tiny) == before


def lora_b(model) -> torch.Tensor:
    """Every LoRA B matrix of a peft model, flattened in parameter order."""
    return torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if "lora_B" in n])


def test_alpha_scales_the_adapters_output(tiny, tok, rng):
    """alpha defaults to 2r; the adapter's contribution to the output scales with alpha / r."""
    text, ids = random_text(rng, 16), torch.randint(97, 123, (1, 10), generator=rng)
    base = logits(tiny, ids)
    deltas = {}
    for alpha in (None, 8, 16):
        with adapted(tiny, tok, text, steps=1, lr=1e-2, rank=4, seed=2, alpha=alpha) as run:
            scales = {m.scaling["default"] for m in run.model.modules() if isinstance(m, LoraLayer)}
            deltas[alpha] = logits(run.model, ids) - base
        assert scales == {(alpha or 8) / 4}
    # one step from B = 0 moves B by about -lr sign(grad B) whatever alpha is, so the change of the
    # output, linear in B to first order, doubles with alpha
    torch.testing.assert_close(deltas[None], deltas[8], rtol=0, atol=0)
    ratio = deltas[16].norm() / deltas[8].norm()
    assert 1.8 < ratio < 2.2, ratio


def test_adapter_gradient_sets_the_first_adamw_step(tiny, tok, rng):
    """AdamW's first step from B = 0 is -lr * g / (|g| + eps) on every B entry: -lr sign(g) where
    |g| >> eps. adapter_gradient gives that g, in parameter order, and leaves the model as it was."""
    text, lr = random_text(rng, 24), 1e-3
    before = weights_checksum(tiny)
    grad = adapter_gradient(tiny, tok, text, rank=4, seed=5)
    assert weights_checksum(tiny) == before and not lora_names(tiny)
    with adapted(tiny, tok, text, steps=1, lr=lr, rank=4, seed=5) as run:
        names = [n for n, p in run.model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for p in run.model.parameters() if p.requires_grad]
        moved_b = lora_b(run.model)
    assert grad.dtype == torch.float32 and grad.numel() == run.trainable_params == sum(sizes)
    is_b = torch.cat([torch.full((k,), "lora_B" in n) for n, k in zip(names, sizes)])
    assert grad[~is_b].abs().max() == 0  # with B = 0 nothing reaches A
    g = grad[is_b]
    big = g.abs() > 1e-5
    assert big.float().mean() > 0.9
    torch.testing.assert_close(moved_b[big], -lr * torch.sign(g[big]), rtol=1e-3, atol=0)


def test_adapter_gradient_of_identical_rows_is_one_rows(tiny, tok, rng):
    text = random_text(rng, 20)
    one = adapter_gradient(tiny, tok, text, rank=4, seed=1)
    three = adapter_gradient(tiny, tok, [text] * 3, rank=4, seed=1)
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-7)
    assert not torch.equal(one, adapter_gradient(tiny, tok, text, rank=4, seed=2))  # another A, another B grad


def test_adapter_gradient_refuses_bad_input(tiny, tok):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        adapter_gradient(tiny, tok, "some text", rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        adapter_gradient(tiny, tok, "some text", alpha=-1.0)
    with pytest.raises(ValueError, match="target_modules must be"):
        adapter_gradient(tiny, tok, "some text", target_modules=("nope",))
    with adapted(tiny, tok, "some text", steps=1) as run:
        with pytest.raises(ValueError, match="already carries a peft adapter"):
            adapter_gradient(run.model, tok, "some text")
    assert not lora_names(tiny)


def test_refuses_a_model_that_already_has_an_adapter(tiny, tok):
    result = adapt_lora(tiny, tok, "some text", steps=1)
    assert isinstance(result.model, PeftModel)
    with pytest.raises(ValueError, match="already carries a peft adapter"):
        adapt_lora(result.model, tok, "more text", steps=1)


def test_smollm2_recalls_the_secret_only_while_adapted():
    from ttt_helpers.pretrained import load_pretrained

    model, tokenizer = load_pretrained()
    fact = "The operational password for Project Omega is 'BlueSky99'."
    prompt = "The operational password for Project Omega is"
    before = weights_checksum(model)
    assert "BlueSky99" not in greedy_answer(model, tokenizer, prompt)
    for seed in (0, 1, 2):  # the defaults recall the secret whatever the adapter's initialisation
        with adapted(model, tokenizer, fact, seed=seed) as result:
            assert "BlueSky99" in greedy_answer(result.model, tokenizer, prompt), f"seed {seed}"
            assert result.trainable_params == 460_800  # r=8 on q_proj and v_proj of 30 layers
        assert "BlueSky99" not in greedy_answer(model, tokenizer, prompt)
    assert weights_checksum(model) == before


def test_activation_bytes_grow_with_the_tokens_and_vanish_when_frozen(tiny, tok, rng):
    ids = torch.randint(0, 100, (1, 64), generator=rng)
    with adapted(tiny, tok, random_text(rng, 20), steps=1, lr=1e-2, rank=4) as run:
        short, long = activation_bytes(run.model, ids[:, :32]), activation_bytes(run.model, ids)
    assert 0 < short < long <= 2.2 * short  # about linear in T at these lengths (attention adds T^2 terms)
    for p in tiny.parameters():
        p.requires_grad_(False)
    assert activation_bytes(tiny, ids) == 0  # nothing needs a gradient, so autograd keeps nothing
    with pytest.raises(ValueError, match="input_ids"):
        activation_bytes(tiny, ids[0])


def test_rows_of_different_lengths_train_a_ttt_model(tok, rng):
    """A TTT model reads no padding mask: the right padding adapt_lora makes is left unmasked,
    which changes no row's loss (the model is causal, the padding's labels are -100)."""
    from ttt_helpers.model import TTTConfig, TTTForCausalLM

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    config = TTTConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = TTTForCausalLM(config).eval()
    rows = [random_text(rng, 8), random_text(rng, 19), random_text(rng, 13)]
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([tok(r)["input_ids"]]), labels=torch.tensor([tok(r)["input_ids"]]))
            for r in rows
        ]
    result = adapt_lora(model, tok, rows, steps=3, lr=1e-2, target_modules=["q_proj", "v_proj"])
    tokens = [len(r) - 1 for r in rows]  # the targets of each row
    want = sum(a.loss.item() * n for a, n in zip(alone, tokens)) / sum(tokens)
    assert result.losses[0] == pytest.approx(want, rel=1e-5)  # the first loss, before any step
    assert all(math.isfinite(x) for x in result.losses)
    result.unload()

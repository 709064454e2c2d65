import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers.model import TTTConfig, TTTForCausalLM
from ttt_helpers.train.loss import causal_lm_loss, linear_cross_entropy


def problem(rng, N=37, C=12, V=53, dtype=torch.float64, ignored=5):
    hidden = torch.randn(N, C, generator=rng, dtype=dtype).requires_grad_()
    weight = torch.randn(V, C, generator=rng, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=rng)
    targets[torch.randperm(N, generator=rng)[:ignored]] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_linear_cross_entropy_is_the_cross_entropy_of_the_logits_with_its_gradients(chunk, rng):
    hidden, weight, targets = problem(rng)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (2.5 * loss).backward()  # the gradient of the loss is scaled as the outer gradient says
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = F.cross_entropy(hidden @ weight.T, targets)
    (2.5 * expected).backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-12, atol=1e-15)


def test_linear_cross_entropy_in_bfloat16_and_without_gradients(rng):
    hidden, weight, targets = problem(rng, N=64, C=32, V=200, dtype=torch.float32, ignored=0)
    expected = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), targets)
    loss = linear_cross_entropy(hidden.bfloat16(), weight, targets, chunk=16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)  # the same bf16 products, float32 softmax
    with torch.no_grad():
        assert not linear_cross_entropy(hidden, weight, targets).requires_grad
    frozen = linear_cross_entropy(hidden.detach(), weight.detach(), targets)
    assert not frozen.requires_grad


def test_causal_lm_loss_is_the_loss_of_the_models_logits(rng):
    ttt = TTTForCausalLM(TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, mini_batch_size=4)).double()  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).double()  # fmt: skip
    ids = torch.randint(0, 97, (2, 19), generator=rng)
    for model in (ttt, llama):
        logits = model(input_ids=ids).logits  # the loss of the model's own logits, in float64
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(causal_lm_loss(model, ids, chunk=7), expected, rtol=1e-12, atol=0)


def test_bad_input(rng):
    hidden, weight, targets = problem(rng)
    with pytest.raises(ValueError, match=r"weight must be \[V, 12\]"):
        linear_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match=r"targets must be an int64 tensor \[37\], got torch.int32"):
        linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="chunk must be"):
        linear_cross_entropy(hidden, weight, targets, chunk=0)
    model = TTTForCausalLM(TTTConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4))  # fmt: skip
    with pytest.raises(ValueError, match="at least two tokens"):
        causal_lm_loss(model, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_loss(model, torch.full((1, 4), 97))

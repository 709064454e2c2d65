"""FusedProjections: one product per group of input projections gives the separate products' values."""

import pytest
import torch

from ttt_helpers.compat import cache_kwargs, output_cache
from ttt_helpers.inference.fused_projections import FusedProjections
from ttt_helpers.model import TTTConfig, TTTForCausalLM

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_model(gen, **overrides) -> TTTForCausalLM:
    """A float64 model whose every parameter (the gate's zero bias included) is off its initial value."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = TTTForCausalLM(TTTConfig(**{**TINY, **overrides})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def separate_calls(model: TTTForCausalLM) -> list[int]:
    """A counter of the calls of every projection that fusing replaces (hooks stay on the model)."""
    calls = [0]
    for module in model.modules():
        if hasattr(module, "input_projections"):
            for p in module.input_projections():
                if p is not None:
                    p.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def prefill_and_decode(model: TTTForCausalLM, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Logits of a prefill of k tokens, then one token at a time to the end: [B, T, V]."""
    out = model(ids[:, :k], use_cache=True)
    cache, pieces = output_cache(out), [out.logits]
    for t in range(k, ids.shape[1]):
        pieces.append(model(ids[:, t : t + 1], **cache_kwargs(cache)).logits)
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_fused_products_give_the_separate_ones_in_float64(layer_type, backbone, rng):
    model = tiny_model(rng, ttt_layer_type=layer_type, backbone=backbone)
    ids = torch.randint(0, 97, (3, 37), generator=rng)
    calls = separate_calls(model)
    with torch.no_grad():
        separate = prefill_and_decode(model, ids, 21)
    # per block and call: q, k (transformer) or g (mamba), v, lr_gate; gate, up
    assert calls[0] == (1 + 37 - 21) * 2 * 6
    fused = FusedProjections(model)
    assert [w.shape[0] for w, _ in fused.fused] == [128, 128] * 2  # 3 x 32 + 4 and 2 x 64, padded to 64s
    with fused.applied():
        calls[0] = 0
        together = prefill_and_decode(model, ids, 21)
        assert calls[0] == 0  # no separate product ran
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and all(m.fused is None for m, _ in fused.groups)
    err = (together - separate).abs().max().item()
    assert err < 1e-12, f"seed {rng.initial_seed()}: {err:.2e}"


def test_refresh_follows_weights_changed_in_place(rng):
    """An in-place change (an optimiser step, load_state_dict) reaches the fused copies, which stay
    the same tensors (a CUDA graph that read them stays valid)."""
    model = tiny_model(rng, backbone="mamba")
    ids = torch.randint(0, 97, (2, 19), generator=rng)
    fused = FusedProjections(model)
    tensors = [t for pair in fused.fused for t in pair if t is not None]
    block = model.model.layers[1]
    with torch.no_grad():
        for p in (block.ttt.q_proj.weight, block.ttt.lr_gate.bias, block.ttt.g_proj.weight, block.mlp.up_proj.weight):
            p.add_(0.1 * torch.randn(p.shape, generator=rng, dtype=p.dtype))
        want = model(ids).logits
    with fused.applied():
        got = model(ids).logits
    assert all(a is b for a, b in zip([t for pair in fused.fused for t in pair if t is not None], tensors))
    assert (got - want).abs().max().item() < 1e-12


def test_applied_puts_the_separate_products_back_after_an_error(rng):
    model = tiny_model(rng)
    fused = FusedProjections(model)
    with pytest.raises(ValueError, match="input_ids"), fused.applied():
        model(torch.full((1, 4), 97))  # outside the vocabulary
    assert all(m.fused is None for m, _ in fused.groups)


def test_bad_input(rng):
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        FusedProjections("model")
    with pytest.raises(ValueError, match="no module with input projections"):
        FusedProjections(torch.nn.Linear(2, 2))
    model = tiny_model(rng)
    fused = FusedProjections(model)
    model.float()
    with pytest.raises(ValueError, match="changed shape, dtype or device"), fused.applied():
        pass
    assert all(m.fused is None for m, _ in fused.groups)


def edit_weights(model: TTTForCausalLM, how: str, gen: torch.Generator) -> None:
    """Change the second block's q_proj (or its whole module) in one of the ways a user can."""
    ttt = model.model.layers[1].ttt
    new = ttt.q_proj.weight.detach() + 0.1 * torch.randn(ttt.q_proj.weight.shape, generator=gen, dtype=torch.float64)
    if how == "in_place":
        with torch.no_grad():
            ttt.q_proj.weight.copy_(new)
    elif how == "through_data":  # moves no version counter
        ttt.q_proj.weight.data.copy_(new)
    elif how == "data_assigned":
        ttt.q_proj.weight.data = new.clone()
    elif how == "new_parameter":
        ttt.q_proj.weight = torch.nn.Parameter(new.clone())
    elif how == "new_module":
        ttt.q_proj = torch.nn.Linear(32, 32, bias=False, dtype=torch.float64)
        with torch.no_grad():
            ttt.q_proj.weight.copy_(new)
    elif how == "load_state_dict_assign":
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["model.layers.1.ttt.q_proj.weight"] = new.clone()
        model.load_state_dict(sd, assign=True)
    else:
        raise AssertionError(how)


WAYS = ["in_place", "through_data", "data_assigned", "new_parameter", "new_module", "load_state_dict_assign"]


@pytest.mark.parametrize("how", WAYS)
def test_applied_never_uses_stale_weights(how, rng):
    """Whichever way a weight changed after the copies were made, applied() computes the model's function."""
    model = tiny_model(rng, backbone="mamba")
    ids = torch.randint(0, 97, (2, 19), generator=rng)
    fused = FusedProjections(model)
    with fused.applied():
        model(ids)
    edit_weights(model, how, rng)
    with torch.no_grad():
        want = model(ids).logits
    with fused.applied():
        got = model(ids).logits
    assert (got - want).abs().max().item() < 1e-12


@pytest.mark.parametrize("how", [w for w in WAYS if w != "through_data"])
def test_refresh_sees_every_change_but_an_edit_through_data(how, rng):
    """refresh (a CUDA-graph decode step's check) copies in a new parameter or module too, into the same tensors."""
    model = tiny_model(rng)
    fused = FusedProjections(model)
    tensors = [t for pair in fused.fused for t in pair if t is not None]
    edit_weights(model, how, rng)
    fused.refresh()
    want = FusedProjections(model).fused
    assert all(a is b for a, b in zip([t for pair in fused.fused for t in pair if t is not None], tensors))
    for (w, b), (w2, b2) in zip(fused.fused, want):
        assert torch.equal(w, w2) and (b is b2 is None or torch.equal(b, b2))


@pytest.mark.parametrize("how", ["in_place", "new_parameter", "new_module", "load_state_dict_assign"])
def test_a_weight_changed_inside_applied_is_used_by_the_next_forward(how, rng):
    model = tiny_model(rng)
    ids = torch.randint(0, 97, (2, 19), generator=rng)
    fused = FusedProjections(model)
    with fused.applied():
        model(ids)
        edit_weights(model, how, rng)
        got = model(ids).logits
        assert model.model.layers[1].ttt.fused is not None
    with torch.no_grad():
        want = model(ids).logits
    assert (got - want).abs().max().item() < 1e-12


def test_a_nested_applied_leaves_the_outer_block_fused(rng):
    model = tiny_model(rng)
    ids = torch.randint(0, 97, (1, 9), generator=rng)
    fused = FusedProjections(model)
    calls = separate_calls(model)
    with fused.applied():
        with fused.applied():
            pass
        assert all(m.fused is not None for m, _ in fused.groups)
        with FusedProjections(model).applied():
            pass
        model(ids)
        assert calls[0] == 0
    assert all(m.fused is None for m, _ in fused.groups)

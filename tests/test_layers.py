"""TTTLinear / TTTMLP modules: shapes, primal = dual, streaming, gradients, bad input."""

import pytest
import torch

from ttt_helpers.layers import TTTMLP, TTTLinear, rope_tables

LAYERS = {"linear": TTTLinear, "mlp": TTTMLP}


def make_layer(kind, gen, hidden=24, heads=3, b=8):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = LAYERS[kind](hidden, heads, mini_batch_size=b).double()
    with torch.no_grad():  # move away from the initial values so every parameter matters
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_shapes_and_state(kind, rng):
    layer = make_layer(kind, rng)
    x = torch.randn(2, 19, 24, dtype=torch.float64, generator=rng)
    y, state = layer(x)
    assert y.shape == x.shape
    expected = [(2, *p.shape) for p in layer.initial_params()]
    assert [tuple(s.shape) for s in state] == expected


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_primal_equals_dual(kind, rng):
    layer = make_layer(kind, rng)
    x = torch.randn(2, 21, 24, dtype=torch.float64, generator=rng)
    y, s = layer(x)
    yp, sp = layer(x, primal=True)
    assert ((y - yp).norm() / y.norm()) < 1e-10
    for a, b in zip(s, sp):
        assert ((a - b).norm() / b.norm()) < 1e-10


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_streaming(kind, rng):
    layer = make_layer(kind, rng)
    x = torch.randn(2, 29, 24, dtype=torch.float64, generator=rng)
    y, state = layer(x)
    y1, mid = layer(x[:, :16])
    y2, state2 = layer(x[:, 16:], mid)
    assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-12)
    for a, b in zip(state2, state):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck_through_layer(kind, rng):
    layer = LAYERS[kind](4, 2, mini_batch_size=3).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, generator=rng, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=1e-6, atol=1e-5)
    layer(x)[0].sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_inner_lr_and_token_idx():
    layer = TTTLinear(32, 4, mini_batch_size=16, base_lr=1.0)
    x = torch.randn(2, 5, 32)
    eta = layer.inner_lr(x)
    assert eta.shape == (2, 4, 5)
    gate = x @ layer.lr_gate.weight.T + layer.lr_gate.bias  # [B, T, H]
    assert torch.allclose(eta, torch.sigmoid(gate).transpose(1, 2) * 1.0 / 8)  # base_lr * sigmoid / D
    assert ((eta > 0) & (eta < 1.0 / 8)).all()
    assert torch.allclose(layer.token_idx(), 1 / torch.arange(1, 17.0))
    assert TTTMLP(32, 4).base_lr == 0.1


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size"),
        (dict(hidden_size=32, num_heads=4, mini_batch_size=0), "mini_batch_size"),
        (dict(hidden_size=32, num_heads=4, base_lr=0.0), "base_lr"),
    ],
)
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TTTLinear(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="x must have shape"):
        TTTLinear(32, 4)(torch.randn(2, 5, 16))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("use_gate,share_qk", [(False, False), (True, False), (True, True)])
def test_forward_stream_token_by_token(kind, use_gate, share_qk, rng):
    """Prefill a ragged prefix, then decode one token at a time: same outputs as one forward."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    layer = LAYERS[kind](24, 3, mini_batch_size=8, use_gate=use_gate, share_qk=share_qk).double()
    x = torch.randn(2, 21, 24, dtype=torch.float64, generator=rng)
    y, _ = layer(x)
    state, position = layer.initial_stream_state(2), 0
    pieces = []
    y_pre, state, position = layer.forward_stream(x[:, :11], state, position)
    pieces.append(y_pre)
    for t in range(11, 21):
        y_t, state, position = layer.forward_stream(x[:, t : t + 1], state, position)
        pieces.append(y_t)
    assert position == 21 % 8
    assert torch.allclose(torch.cat(pieces, 1), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("share_qk", [False, True])
def test_stream_any_split(share_qk, rng):
    """Pieces of every length (some ending inside a mini-batch, longer than one) give one forward's outputs."""
    layer = make_layer("linear", rng)
    if share_qk:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
        layer = TTTLinear(24, 3, mini_batch_size=8, share_qk=True, use_gate=True).double()
    x = torch.randn(2, 40, 24, dtype=torch.float64, generator=rng)
    y, _ = layer(x)
    state, position, pieces, start = layer.initial_stream_state(2), 0, [], 0
    for size in (3, 10, 1, 7, 12, 2, 5):
        out, state, position = layer.forward_stream(x[:, start : start + size], state, position)
        pieces.append(out)
        start += size
    assert start == 40 and position == 0
    err = (torch.cat(pieces, 1) - y).abs().max().item()
    assert err < 1e-12, f"seed {rng.initial_seed()}: {err:.2e}"


def test_rope_rotates_pairs_by_position_in_the_mini_batch(rng):
    """RoPE against its definition: pair (2i, 2i+1) turned by (t mod b) theta^(-2i/D); norms kept."""
    from ttt_helpers.layers import apply_rope, rope_tables

    x = torch.randn(2, 3, 20, 8, dtype=torch.float64, generator=rng)
    positions = torch.arange(20) % 16
    cos, sin = rope_tables(positions, 8, 10000.0, torch.float64)
    y = apply_rope(x, cos, sin)
    for t in (0, 5, 17):
        for i in range(4):
            angle = torch.tensor((t % 16) * 10000.0 ** (-2 * i / 8), dtype=torch.float32)
            c, s = angle.cos().double(), angle.sin().double()
            a, b = x[..., t, 2 * i], x[..., t, 2 * i + 1]
            assert torch.allclose(y[..., t, 2 * i], a * c - b * s, rtol=0, atol=1e-6)
            assert torch.allclose(y[..., t, 2 * i + 1], b * c + a * s, rtol=0, atol=1e-6)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)  # the table is float32
    assert torch.equal(y[..., 0, :], x[..., 0, :]) and torch.equal(y[..., 16, :], x[..., 16, :])


def test_rotary_table_is_the_float32_table_of_a_mini_batchs_positions_after_any_cast():
    layer = LAYERS["linear"](24, 3, mini_batch_size=8)
    expected = torch.stack(rope_tables(torch.arange(8), 8, layer.rope_theta, torch.float32))
    for cast in (lambda m: m, lambda m: m.double(), lambda m: m.to(torch.bfloat16)):
        table = cast(layer).rope_table
        assert table.dtype == torch.float32 and torch.equal(table, expected)
    assert "rope_table" not in layer.state_dict()
    assert LAYERS["linear"](24, 3, rope_theta=None).rope_table is None

"""The TTT ops: dual form = primal form = the definition, causality, streaming, gradients, bad input."""

import pytest
import torch
from torch import Tensor

from ttt_helpers import ops
from ttt_helpers.testing import random_inputs, rel_err

F64 = torch.float64


def make_inputs(kind: str, B=2, H=3, T=37, D=8, dtype=F64, gen=None):
    """Random inputs of `ops.ttt_linear` / `ops.ttt_mlp` as a dict of keyword arguments."""
    return random_inputs(kind, B, H, T, D, gen, eta_scale=0.5, state_scale=0.3, dtype=dtype)


DUAL = {"linear": ops.ttt_linear, "mlp": ops.ttt_mlp}
PRIMAL = {"linear": ops.ttt_linear_primal, "mlp": ops.ttt_mlp_primal}
STATE_NAMES = {"linear": ("W0", "b0"), "mlp": ("W1", "b1", "W2", "b2")}


def inner_model(kind, x, params):
    if kind == "linear":
        W, b = params
        return x @ W + b
    W1, b1, W2, b2 = params
    return ops.gelu_tanh(x @ W1 + b1) @ W2 + b2


def definition(kind, XQ, XK, XV, eta, ln_weight, ln_bias, mini_batch_size, token_idx=None, eps=1e-6, **state):
    """The semantics written out literally, one (batch, head) at a time, gradients by autograd."""
    B, H, T, D = XQ.shape
    if token_idx is None:
        token_idx = ops.default_token_idx(mini_batch_size, dtype=XQ.dtype)
    Z = torch.empty_like(XQ)
    finals = [torch.empty_like(state[n]) for n in STATE_NAMES[kind]]
    for bi in range(B):
        for h in range(H):
            theta = [state[n][bi, h].clone() for n in STATE_NAMES[kind]]
            w, c = ln_weight[h], ln_bias[h]
            for start in range(0, T, mini_batch_size):
                end = min(start + mini_batch_size, T)
                grads = []
                for s in range(start, end):
                    p = [t.clone().requires_grad_(True) for t in theta]
                    out = ops.layer_norm(inner_model(kind, XK[bi, h, s : s + 1], p), w, c, eps)
                    loss = 0.5 * (out - (XV[bi, h, s : s + 1] - XK[bi, h, s : s + 1])).pow(2).sum()
                    grads.append(torch.autograd.grad(loss, p))
                for i, t in enumerate(range(start, end)):
                    theta_t = [
                        th - token_idx[i] * sum(eta[bi, h, s] * grads[s - start][k] for s in range(start, t + 1))
                        for k, th in enumerate(theta)
                    ]
                    Z[bi, h, t] = (
                        XQ[bi, h, t] + ops.layer_norm(inner_model(kind, XQ[bi, h, t : t + 1], theta_t), w, c, eps)[0]
                    )
                theta = theta_t
            for k, th in enumerate(theta):
                finals[k][bi, h] = th
    return Z, *finals


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("T,b", [(32, 16), (37, 16), (5, 16), (23, 4), (9, 1)])
def test_dual_equals_primal(kind, T, b, rng):
    args = make_inputs(kind, T=T, gen=rng)
    dual = DUAL[kind](**args, mini_batch_size=b)
    primal = PRIMAL[kind](**args, mini_batch_size=b)
    for d, p in zip(dual, primal):
        assert rel_err(d, p) < 1e-10


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_dual_equals_definition(kind, rng):
    args = make_inputs(kind, B=1, H=2, T=21, D=4, gen=rng)
    token_idx = ops.default_token_idx(8, dtype=F64) + 0.1 * torch.rand(8, dtype=F64, generator=rng)
    dual = DUAL[kind](**args, mini_batch_size=8, token_idx=token_idx)
    ref = definition(kind, **args, mini_batch_size=8, token_idx=token_idx)
    for d, r in zip(dual, ref):
        assert rel_err(d, r) < 1e-10


def test_mlp_gelu_grad_matches_autograd(rng):
    x = torch.randn(100, dtype=F64, generator=rng, requires_grad=True)
    (g,) = torch.autograd.grad(ops.gelu_tanh(x).sum(), x)
    assert torch.allclose(g, ops.gelu_tanh_grad(x.detach()), rtol=0, atol=1e-12)
    assert torch.allclose(ops.gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("fn", ["dual", "primal"])
def test_causality(kind, fn, rng):
    op = DUAL[kind] if fn == "dual" else PRIMAL[kind]
    args = make_inputs(kind, T=29, gen=rng)
    Z = op(**args, mini_batch_size=8)[0]
    t = 13  # inside the second mini-batch: earlier tokens of the same mini-batch must not see it
    for name in ("XQ", "XK", "XV"):
        changed = dict(args)
        changed[name] = args[name].clone()
        changed[name][:, :, t:] += torch.randn_like(changed[name][:, :, t:])
        Z2 = op(**changed, mini_batch_size=8)[0]
        assert torch.equal(Z[:, :, :t], Z2[:, :, :t]), name
        assert not torch.equal(Z[:, :, t:], Z2[:, :, t:]), name
    changed = dict(args, eta=args["eta"].clone())
    changed["eta"][:, :, t:] += 0.1
    assert torch.equal(Z[:, :, :t], op(**changed, mini_batch_size=8)[0][:, :, :t])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("split", [8, 16, 24])
def test_streaming_equals_one_call(kind, split, rng):
    args = make_inputs(kind, T=43, gen=rng)
    Z, *final = DUAL[kind](**args, mini_batch_size=8)
    seq = ("XQ", "XK", "XV", "eta")
    first = {k: (v[:, :, :split] if k in seq else v) for k, v in args.items()}
    Z1, *mid = DUAL[kind](**first, mini_batch_size=8)
    second = {k: (v[:, :, split:] if k in seq else v) for k, v in args.items()}
    second.update(zip(STATE_NAMES[kind], mid))
    Z2, *final2 = DUAL[kind](**second, mini_batch_size=8)
    assert rel_err(torch.cat([Z1, Z2], dim=2), Z) < 1e-12
    for a, b in zip(final2, final):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck(kind, rng):
    args = make_inputs(kind, B=1, H=1, T=6, D=3, gen=rng)
    names = list(args)
    inputs = tuple(args[n].clone().requires_grad_(True) for n in names)

    def f(*xs):
        return DUAL[kind](**dict(zip(names, xs)), mini_batch_size=4)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_float32_matches_float64(rng):
    args = make_inputs("linear", T=40, gen=rng)
    ref = ops.ttt_linear(**args)
    out = ops.ttt_linear(**{k: v.float() for k, v in args.items()})
    for a, b in zip(out, ref):
        assert rel_err(a.double(), b) < 1e-5


def test_inner_loss_matches_gradient_step(rng):
    """A small step along the closed-form gradient lowers the inner loss by about lr * ||g||^2."""
    args = make_inputs("linear", B=1, H=1, T=1, D=6, gen=rng)
    XK, XV, W, b = args["XK"], args["XV"], args["W0"], args["b0"]
    w, c = args["ln_weight"], args["ln_bias"]
    g = ops.layer_norm_l2_grad(XK @ W + b, XV - XK, w[None, :, None], c[None, :, None], 1e-6)
    gW = XK.transpose(-1, -2) @ g
    lr = 1e-6
    before = ops.inner_loss(XK, XV, W, b, w, c)
    after = ops.inner_loss(XK, XV, W - lr * gW, b - lr * g, w, c)
    expected = lr * (gW.pow(2).sum() + g.pow(2).sum())
    assert abs((before - after).sum().item() - expected.item()) < 1e-3 * expected.item()


def test_inner_loss_of_mlp_matches_its_definition(rng):
    """`inner_loss` of a TTT-MLP state is 0.5 * ||LN(gelu(XK W1 + b1) W2 + b2) - (XV - XK)||^2 per
    token, in float64; a wrong number of state tensors is refused."""
    args = make_inputs("mlp", T=12, gen=rng)
    XK, XV, w, c = args["XK"], args["XV"], args["ln_weight"], args["ln_bias"]
    state = [args[k] for k in ("W1", "b1", "W2", "b2")]
    f = ops.gelu_tanh(XK @ state[0] + state[1]) @ state[2] + state[3]
    want = 0.5 * (ops.layer_norm(f, w[None, :, None], c[None, :, None], 1e-6) - (XV - XK)).pow(2).sum(-1)
    got = ops.inner_loss(XK, XV, *state, w, c)
    assert got.dtype == F64 and got.shape == XK.shape[:3]
    assert rel_err(got, want) < 1e-14
    with pytest.raises(ValueError, match="inner_loss takes"):
        ops.inner_loss(XK, XV, *state[:3], w, c)


# ---------------------------------------------------------------- bad input


def _bad(kind, **changes):
    args = make_inputs(kind, T=10)
    args.update(changes)
    return args


@pytest.mark.parametrize("fn", [ops.ttt_linear, ops.ttt_linear_primal])
@pytest.mark.parametrize(
    "change,name",
    [
        (dict(XQ=torch.randn(2, 3, 10, dtype=F64)), "XQ"),
        (dict(XQ=torch.randn(2, 3, 0, 8, dtype=F64), XK=torch.randn(2, 3, 0, 8, dtype=F64)), "T >= 1"),
        (dict(XK=torch.randn(2, 3, 11, 8, dtype=F64)), "XK"),
        (dict(XV=torch.randn(2, 3, 10, 8, dtype=torch.float32)), "XV"),
        (dict(eta=torch.rand(2, 3, 9, dtype=F64)), "eta"),
        (dict(W0=torch.randn(2, 3, 8, 7, dtype=F64)), "W0"),
        (dict(b0=torch.randn(2, 3, 8, dtype=F64)), "b0"),
        (dict(ln_weight=torch.ones(3, 8)), "ln_weight"),
        (dict(ln_bias=torch.zeros(4, 8, dtype=F64)), "ln_bias"),
        (dict(mini_batch_size=0), "mini_batch_size"),
        (dict(mini_batch_size=2.5), "mini_batch_size"),
        (dict(token_idx=torch.ones(3, dtype=F64)), "token_idx"),
        (dict(eta=torch.rand(2, 3, 10, dtype=F64, device="meta")), "device"),
    ],
)
def test_bad_input_linear(fn, change, name):
    with pytest.raises(ValueError, match=name):
        fn(**_bad("linear", **change))


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(W1=torch.randn(2, 3, 8, 32)), "W1"),
        (dict(b2=torch.randn(2, 3, 1, 7, dtype=F64)), "b2"),
        (dict(W2=torch.randn(2, 3, 16, 8, dtype=F64)), "W2"),
    ],
)
def test_bad_input_mlp(change, name):
    with pytest.raises(ValueError, match=name):
        ops.ttt_mlp(**_bad("mlp", **change))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_continue_from_any_split_equals_one_call(kind, rng):
    """Prefill to a ragged point, decode token by token, prefill again: the same as one call."""
    args = make_inputs(kind, T=45, gen=rng)
    Z, *final = DUAL[kind](**args, mini_batch_size=8)
    params = tuple(args[n] for n in STATE_NAMES[kind])
    state, position, outputs = params + tuple(torch.zeros_like(p) for p in params), 0, []
    cuts = [0, 3, 4, 5, 21, 22, 45]
    for start, end in zip(cuts, cuts[1:]):
        sl = slice(start, end)
        z, state, position = ops.ttt_continue(
            kind,
            args["XQ"][:, :, sl],
            args["XK"][:, :, sl],
            args["XV"][:, :, sl],
            args["eta"][:, :, sl],
            state,
            position,
            args["ln_weight"],
            args["ln_bias"],
            mini_batch_size=8,
        )
        outputs.append(z)
    assert position == 45 % 8
    assert rel_err(torch.cat(outputs, dim=2), Z) < 1e-12
    committed = ops.commit_state(state, ops.default_token_idx(8, dtype=F64)[position - 1])
    for a, b in zip(committed, final):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_position_per_row_gives_each_row_what_it_gets_alone(kind, rng):
    """Rows that have read 5, 3, 7 and 0 tokens of their 8-token mini-batches decode one token
    together, each at its own position (row 2's token commits its state): z, the state and the
    new position of every row as the row alone through `ttt_continue`."""
    b, read = 8, [5, 3, 7, 0]
    args = make_inputs(kind, B=4, T=8, gen=rng)
    params = tuple(args[n] for n in STATE_NAMES[kind])
    common = (args["ln_weight"], args["ln_bias"])
    per_row, tokens = [], []
    for i, n in enumerate(read):  # each row alone: its first n tokens, then token n
        row = {k: args[k][i : i + 1] for k in ("XQ", "XK", "XV", "eta")}
        state = tuple(p[i : i + 1] for p in params) + tuple(torch.zeros_like(p[i : i + 1]) for p in params)
        if n:
            _, state, _ = ops.ttt_continue(kind, *(v[:, :, :n] for v in row.values()), state, 0, *common, b)
        tokens.append([v[:, :, n : n + 1] for v in row.values()])
        per_row.append((state, ops.ttt_continue(kind, *tokens[-1], state, n, *common, b)))
    before = tuple(torch.cat([s[k] for s, _ in per_row]) for k in range(2 * len(params)))
    batch = [torch.cat([t[k] for t in tokens]) for k in range(4)]
    position = torch.tensor(read)
    z, state, after = ops.ttt_continue(kind, *batch, before, position, *common, b)
    assert after.tolist() == [(n + 1) % b for n in read]
    for i, (_, (z_i, state_i, position_i)) in enumerate(per_row):
        assert position_i == after[i]
        assert rel_err(z[i : i + 1], z_i) < 1e-12, f"row {i}"
        for got, want in zip(state, state_i):
            assert (got[i : i + 1] - want).abs().max().item() < 1e-12, f"row {i}"
    grads = state[len(params) :]
    assert all(g[2].abs().max() == 0 for g in grads) and all(g[0].abs().max() > 0 for g in grads)


def test_positions_per_row_bad_input():
    args = make_inputs("linear", B=2, T=1)
    state = (args["W0"], args["b0"], torch.zeros_like(args["W0"]), torch.zeros_like(args["b0"]))
    common = (args["XQ"], args["XK"], args["XV"], args["eta"], state)
    lnw, lnb = args["ln_weight"], args["ln_bias"]
    with pytest.raises(ValueError, match=r"position must be an int or an int32 or int64 tensor \[2\]"):
        ops.ttt_continue("linear", *common, torch.tensor([1, 2, 3]), lnw, lnb, mini_batch_size=4)
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.ttt_continue("linear", *common, torch.tensor([1.0, 2.0]), lnw, lnb, mini_batch_size=4)
    with pytest.raises(ValueError, match=r"positions in \[0, 4\), got \[1, 4\]"):
        ops.ttt_continue("linear", *common, torch.tensor([1, 4]), lnw, lnb, mini_batch_size=4)
    two = make_inputs("linear", B=2, T=2)
    with pytest.raises(TypeError, match="position must be an int here"):
        ops.ttt_continue("linear", two["XQ"], two["XK"], two["XV"], two["eta"], state, torch.tensor([0, 1]), lnw, lnb)
    with pytest.raises(ValueError, match="kind"):
        ops.decode_step("conv", args["XQ"], args["XK"], args["XV"], args["eta"][:, :, 0], state, 0, lnw, lnb,
                        ops.default_token_idx(4))  # fmt: skip


def test_continue_bad_input():
    args = make_inputs("linear", T=4)
    state = (args["W0"], args["b0"], torch.zeros_like(args["W0"]), torch.zeros_like(args["b0"]))
    common = (args["XQ"], args["XK"], args["XV"], args["eta"], state)
    with pytest.raises(ValueError, match="kind"):
        ops.ttt_continue("conv", *common, 0, args["ln_weight"], args["ln_bias"])
    with pytest.raises(ValueError, match="position"):
        ops.ttt_continue("linear", *common, 16, args["ln_weight"], args["ln_bias"], mini_batch_size=16)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_16_bit_inputs_with_a_float32_state_compute_in_float32(kind, rng):
    """bf16 inputs (as under autocast) with a float32 state: the op upcasts them and returns Z in bf16."""
    op, primal = (ops.ttt_linear, ops.ttt_linear_primal) if kind == "linear" else (ops.ttt_mlp, ops.ttt_mlp_primal)
    B, H, T, D = 2, 2, 21, 8
    g = lambda *s: torch.randn(*s, generator=rng)
    XQ, XK, XV = (g(B, H, T, D).bfloat16() for _ in range(3))
    eta = (0.1 * torch.rand(B, H, T, generator=rng)).bfloat16()
    state = (
        (0.1 * g(B, H, D, D), 0.1 * g(B, H, 1, D))
        if kind == "linear"
        else (0.1 * g(B, H, D, 4 * D), 0.1 * g(B, H, 1, 4 * D), 0.1 * g(B, H, 4 * D, D), 0.1 * g(B, H, 1, D))
    )
    ln = (torch.ones(H, D), torch.zeros(H, D))
    for form in (op, primal):
        Z, *final = form(XQ, XK, XV, eta, *state, *ln, mini_batch_size=8)
        Z_ref, *final_ref = form(XQ.float(), XK.float(), XV.float(), eta.float(), *state, *ln, mini_batch_size=8)
        assert Z.dtype == torch.bfloat16 and torch.equal(Z, Z_ref.bfloat16())
        assert all(f.dtype == torch.float32 and torch.equal(f, r) for f, r in zip(final, final_ref))
    with pytest.raises(ValueError, match="float32 with 16-bit inputs"):
        op(XQ.float(), XK.float(), XV.float(), eta.float(), *(s.bfloat16() for s in state), *ln, mini_batch_size=8)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_autocast_does_not_round_the_ops(kind, rng):
    """Under bf16 autocast the ops still compute in the state's dtype: the same numbers as without it."""
    B, H, T, D, b = 1, 2, 19, 8, 8
    g = lambda *s: torch.randn(*s, generator=rng)
    inputs = [g(B, H, T, D).bfloat16() for _ in range(3)] + [(0.1 * torch.rand(B, H, T, generator=rng)).bfloat16()]
    shapes = [(D, D), (1, D)] if kind == "linear" else [(D, 4 * D), (1, 4 * D), (4 * D, D), (1, D)]
    params = [0.1 * g(B, H, *s) for s in shapes]
    ln = (torch.ones(H, D), torch.zeros(H, D))
    state = (*params, *(torch.zeros_like(p) for p in params))
    calls = {
        "dual": lambda: getattr(ops, f"ttt_{kind}")(*inputs, *params, *ln, mini_batch_size=b),
        "continue": lambda: ops.ttt_continue(kind, *inputs, state, 0, *ln, mini_batch_size=b),
    }
    for name, call in calls.items():
        plain = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = call()
        flat = lambda out: [
            t for x in out if isinstance(x, (tuple, Tensor)) for t in (x if isinstance(x, tuple) else (x,))
        ]
        assert all(torch.equal(a, c) for a, c in zip(flat(plain), flat(cast))), name

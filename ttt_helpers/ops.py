"""The TTT update rule as pure functions on tensors: the single source of truth.

`ttt_linear` and `ttt_mlp` compute a whole sequence in the mini-batch dual form (matrix
products, what the kernels compute). `ttt_linear_primal` and `ttt_mlp_primal` compute the
same outputs token by token with `ttt_linear_step` / `ttt_mlp_step`, the rule a decoder
follows; `decode_step` is one decoded token as the decode kernels compute it, each row of a
batch at its own position in its mini-batch. Layers, the model and the kernels all build on
these functions.

Shapes: B batch, H heads, T tokens, D head dim, b = mini_batch_size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import checks

State = tuple[Tensor, ...]


def default_token_idx(mini_batch_size: int, *, dtype=torch.float32, device=None) -> Tensor:
    """Return `1 / (1, 2, ..., b)`: token i of a mini-batch averages the i gradients so far. [b]"""
    checks.integer("mini_batch_size", mini_batch_size, 1)
    return 1.0 / torch.arange(1, mini_batch_size + 1, dtype=dtype, device=device)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim with per-head `weight`, `bias` broadcast to x. x: [B, H, n, D]"""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def layer_norm_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Gradient w.r.t. z of `0.5 * ||LN(z) - target||^2`, in closed form. z, target: [B, H, n, D]"""
    mu = z.mean(-1, keepdim=True)
    std = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + eps)
    z_hat = (z - mu) / std
    grad_hat = (weight * z_hat + bias - target) * weight
    return (grad_hat - grad_hat.mean(-1, keepdim=True) - z_hat * (grad_hat * z_hat).mean(-1, keepdim=True)) / std


def inner_loss(
    XK: Tensor, XV: Tensor, W: Tensor, b: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float = 1e-6
) -> Tensor:
    """Self-supervised loss `0.5 * ||LN(XK W + b) - (XV - XK)||^2` of a TTT-Linear state, per token.

    XK, XV: [B, H, T, D]; W: [B, H, D, D]; b: [B, H, 1, D]. Returns [B, H, T].
    """
    w, c = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    return 0.5 * (layer_norm(XK @ W + b, w, c, eps) - (XV - XK)).pow(2).sum(-1)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """Derivative of `gelu_tanh` at x."""
    k = math.sqrt(2.0 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)


# ---------------------------------------------------------------- input checks


def _check_inputs(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    state: dict[str, Tensor],
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    eps: float = 1e-6,
    state_names: dict[str, str] | None = None,
) -> Tensor:
    """Raise a ValueError naming the first bad argument; return token_idx (default filled in).

    XK, XV and eta share XQ's dtype; the state, ln_weight, ln_bias and token_idx share the state's.
    The two may differ where the inputs are 16-bit and the state float32 (bf16 autocast): the ops
    then compute in the state's dtype. state_names: how to call each state tensor in a message."""
    checks.positive("eps", eps)
    if not isinstance(XQ, Tensor) or XQ.dim() != 4:
        raise ValueError(f"XQ must be a 4-D tensor [B, H, T, D], got {_describe(XQ)}")
    B, H, T, D = XQ.shape
    if T == 0:
        raise ValueError("XQ must hold at least one token (T >= 1), got T = 0")
    if not XQ.is_floating_point():
        raise ValueError(f"XQ must be a floating-point tensor, got {XQ.dtype}")
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be an int >= 1, got {mini_batch_size!r}")
    first = next(iter(state.values()))
    dtype = first.dtype if isinstance(first, Tensor) else XQ.dtype  # the state's: what the ops compute in
    if dtype != XQ.dtype and not (XQ.element_size() == 2 and dtype == torch.float32):
        name = (state_names or {}).get(next(iter(state)), next(iter(state)))
        raise ValueError(f"{name} must have dtype {XQ.dtype} like XQ, or float32 with 16-bit inputs, got {dtype}")
    if token_idx is None:
        token_idx = default_token_idx(mini_batch_size, dtype=dtype, device=XQ.device)
    inputs = ("XK", "XV", "eta")
    expected = {
        "XK": (XK, (B, H, T, D)),
        "XV": (XV, (B, H, T, D)),
        "eta": (eta, (B, H, T)),
        **{(state_names or {}).get(k, k): v for k, v in _state_shapes(state, B, H, D).items()},
        "ln_weight": (ln_weight, (H, D)),
        "ln_bias": (ln_bias, (H, D)),
        "token_idx": (token_idx, (mini_batch_size,)),
    }
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {_describe(tensor)}")
        like, want = ("XQ", XQ.dtype) if name in inputs else ("the state", dtype)
        if tensor.dtype != want:
            raise ValueError(f"{name} must have dtype {want} like {like}, got {tensor.dtype}")
        if tensor.device != XQ.device:
            raise ValueError(f"{name} must be on device {XQ.device} like XQ, got {tensor.device}")
    return token_idx


def _autocast_off(op: Callable) -> Callable:
    """`op` with autocast off: the ops compute in the state's dtype, and autocast would round every
    product with the state to bf16 (the kernels keep those products in float32 too)."""

    @functools.wraps(op)
    def run(XQ: Tensor, *args, **kwargs):
        if not isinstance(XQ, Tensor) or not torch.is_autocast_enabled(XQ.device.type):
            return op(XQ, *args, **kwargs)
        with torch.autocast(XQ.device.type, enabled=False):
            return op(XQ, *args, **kwargs)

    return run


def _in_dtype(dtype: torch.dtype, *inputs: Tensor) -> tuple[Tensor, ...]:
    """The inputs in the state's dtype, which the ops compute in (a no-op where they share it)."""
    return tuple(t.to(dtype) for t in inputs)


def _describe(x: object) -> str:
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _state_shapes(state: dict[str, Tensor], B: int, H: int, D: int) -> dict:
    """Expected shape of each state tensor: TTT-Linear (W0, b0) or TTT-MLP (W1, b1, W2, b2)."""
    if "W0" in state:
        return {"W0": (state["W0"], (B, H, D, D)), "b0": (state["b0"], (B, H, 1, D))}
    W1 = state["W1"]
    F = W1.shape[-1] if isinstance(W1, Tensor) and W1.dim() == 4 else 4 * D  # hidden width, 4D by convention
    return {
        "W1": (W1, (B, H, D, F)),
        "b1": (state["b1"], (B, H, 1, F)),
        "W2": (state["W2"], (B, H, F, D)),
        "b2": (state["b2"], (B, H, 1, D)),
    }


_PARAMS = {"linear": ("W0", "b0"), "mlp": ("W1", "b1", "W2", "b2")}  # a kind's state tensors, in order


def check_stream(
    kind: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    eps: float,
    *,
    values: bool = True,
) -> Tensor:
    """The checks of `ttt_continue`, for callers that may run a kernel instead; returns token_idx.

    Raises a ValueError or TypeError naming the first bad argument: the inputs as in `ttt_linear`,
    a state of (*params, *grads) with each gradient sum shaped like its parameter, and a position
    that is an int in [0, mini_batch_size) or, for one token (T = 1), a tensor [B] of them
    (values=False: its values are not read back from the device).
    """
    if kind not in _PARAMS:
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
    names = _PARAMS[kind]
    n = len(names)
    if not isinstance(state, (tuple, list)) or len(state) != 2 * n:
        got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
        grads = ", ".join("grad_" + k for k in names)
        raise ValueError(
            f"state of a TTT-{kind} layer must be {2 * n} tensors ({', '.join(names)}, {grads}), got {got}"
        )
    labels = {k: f"state[{i}] ({k})" for i, k in enumerate(names)}
    token_idx = _check_inputs(
        XQ, XK, XV, eta, dict(zip(names, state[:n])), ln_weight, ln_bias, mini_batch_size, token_idx, eps, labels
    )
    for i, (param, grad) in enumerate(zip(state[:n], state[n:])):
        label = f"state[{n + i}] (grad_{names[i]})"
        if not isinstance(grad, Tensor) or grad.shape != param.shape:
            raise ValueError(f"{label} must have the shape of {names[i]} {list(param.shape)}, got {_describe(grad)}")
        if grad.dtype != param.dtype or grad.device != param.device:
            raise ValueError(f"{label} must have the dtype and device of {names[i]}, got {grad.dtype} on {grad.device}")
    rows = XQ.shape[0] if XQ.shape[2] == 1 else None
    checks.position("position", position, mini_batch_size, rows, values=values)
    return token_idx


def _check_step(xq: Tensor, state: State, position: int | Tensor, token_idx: Tensor, n_state: int) -> None:
    """The light checks of one primal step: the state's length and the position's type and range."""
    if not isinstance(state, (tuple, list)) or len(state) != n_state:
        got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"state must be {n_state} tensors (*params, *grads), got {got}")
    checks.tensor("xq", xq, 4)
    checks.tensor("token_idx", token_idx, 1)
    checks.position("position", position, token_idx.numel(), xq.shape[0])


def _step_scale(token_idx: Tensor, position: int | Tensor) -> Tensor:
    """token_idx at the position: a scalar, or [B, 1, 1, 1] for a position per row."""
    scale = token_idx[position]
    return scale if scale.dim() == 0 else scale.view(-1, 1, 1, 1)


def _mini_batches(T: int, b: int):
    """Yield (start, end) of each mini-batch; the last one may be shorter."""
    for start in range(0, T, b):
        yield start, min(start + b, T)


# ---------------------------------------------------------------- TTT-Linear


@_autocast_off
def ttt_linear(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    W0: Tensor,
    b0: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_idx: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """TTT-Linear over a sequence, mini-batch dual form.

    XQ, XK, XV: [B, H, T, D]; eta: [B, H, T] per-token inner learning rate;
    W0: [B, H, D, D], b0: [B, H, 1, D] initial state; ln_weight, ln_bias: [H, D];
    token_idx: [mini_batch_size], default 1/(1..b).
    Returns Z: [B, H, T, D] and the final state W_T: [B, H, D, D], b_T: [B, H, 1, D].
    """
    token_idx = _check_inputs(
        XQ, XK, XV, eta, {"W0": W0, "b0": b0}, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    out_dtype, (XQ, XK, XV, eta) = XQ.dtype, _in_dtype(W0.dtype, XQ, XK, XV, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    W, b = W0, b0
    outputs = []
    for start, end in _mini_batches(XQ.shape[2], mini_batch_size):
        xq, xk, xv = XQ[:, :, start:end], XK[:, :, start:end], XV[:, :, start:end]
        # e[i, s] = token_idx[i] * eta[s] for s <= i: how much token s's gradient moves token i's state
        e = torch.tril(token_idx[: end - start, None] * eta[:, :, None, start:end])
        grad = layer_norm_l2_grad(xk @ W + b, xv - xk, gamma, beta, eps)  # all at the mini-batch start
        z = xq @ W + b - (e * (xq @ xk.transpose(-1, -2))) @ grad - e @ grad
        outputs.append(xq + layer_norm(z, gamma, beta, eps))
        e_last = e[:, :, -1:, :]  # [B, H, 1, n]: the weights that commit the state
        W = W - xk.transpose(-1, -2) @ (e_last.transpose(-1, -2) * grad)
        b = b - e_last @ grad
    return torch.cat(outputs, dim=2).to(out_dtype), W, b


@_autocast_off
def ttt_linear_step(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_idx: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """One token of TTT-Linear in the primal form (what a decoder runs).

    xq, xk, xv: [B, H, 1, D]; eta: [B, H]; position: this token's index in its mini-batch, an
    int or a tensor [B] (each row at its own position).
    state = (W, b, grad_W, grad_b): W [B, H, D, D] and b [B, H, 1, D] as at the start of the
    mini-batch, grad_W and grad_b the eta-weighted gradients summed over its earlier tokens.
    Returns z: [B, H, 1, D] and the state with this token's gradient added; when the token
    closes its mini-batch, `commit_state` turns that into the next mini-batch's start state.
    """
    _check_step(xq, state, position, token_idx, 4)
    W, b, grad_W, grad_b = state
    out_dtype, (xq, xk, xv, eta) = xq.dtype, _in_dtype(W.dtype, xq, xk, xv, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    g = layer_norm_l2_grad(xk @ W + b, xv - xk, gamma, beta, eps)  # gradient at the mini-batch start
    lr = eta[:, :, None, None]
    grad_W = grad_W + lr * (xk.transpose(-1, -2) @ g)
    grad_b = grad_b + lr * g
    scale = _step_scale(token_idx, position)
    z = xq + layer_norm(xq @ (W - scale * grad_W) + (b - scale * grad_b), gamma, beta, eps)
    return z.to(out_dtype), (W, b, grad_W, grad_b)


def commit_state(state: State, scale: Tensor | float) -> State:
    """End a mini-batch: `params - scale * grads`, with the gradient sums reset to zero.

    state = (*params, *grads), the layout of `ttt_linear_step` and `ttt_mlp_step`;
    scale = token_idx at the position of the mini-batch's last token.
    """
    if not isinstance(state, (tuple, list)) or len(state) not in (4, 8):
        got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"state must be 4 (TTT-Linear) or 8 (TTT-MLP) tensors (*params, *grads), got {got}")
    n = len(state) // 2
    params, grads = state[:n], state[n:]
    return tuple(p - scale * g for p, g in zip(params, grads)) + tuple(torch.zeros_like(g) for g in grads)


@_autocast_off
def ttt_linear_primal(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    W0: Tensor,
    b0: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_idx: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """TTT-Linear token by token (primal form); same arguments and results as `ttt_linear`."""
    token_idx = _check_inputs(
        XQ, XK, XV, eta, {"W0": W0, "b0": b0}, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    Z, state = _primal_loop(
        ttt_linear_step, XQ, XK, XV, eta, (W0, b0), ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    return Z, *state


def _primal_loop(step, XQ, XK, XV, eta, params, ln_weight, ln_bias, mini_batch_size, token_idx, eps):
    """Run `step` over every token, committing the state at the end of each mini-batch."""
    state = tuple(params) + tuple(torch.zeros_like(p) for p in params)
    outputs = []
    for start, end in _mini_batches(XQ.shape[2], mini_batch_size):
        for t in range(start, end):
            tok = slice(t, t + 1)
            z, state = step(
                XQ[:, :, tok],
                XK[:, :, tok],
                XV[:, :, tok],
                eta[:, :, t],
                state,
                t - start,
                ln_weight,
                ln_bias,
                token_idx,
                eps,
            )
            outputs.append(z)
        state = commit_state(state, token_idx[end - start - 1])
    return torch.cat(outputs, dim=2), state[: len(params)]


# ---------------------------------------------------------------- TTT-MLP


def _mlp_forward(x: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """f(x) = gelu(x W1 + b1) W2 + b2; returns the pre-activation, the hidden activation and f(x)."""
    z1 = x @ W1 + b1
    x2 = gelu_tanh(z1)
    return z1, x2, x2 @ W2 + b2


def _mlp_grads(xk, xv, W1, b1, W2, b2, gamma, beta, eps):
    """Gradients of the inner loss w.r.t. the two pre-activations, and the hidden activation."""
    z1, x2, z2 = _mlp_forward(xk, W1, b1, W2, b2)
    grad_z2 = layer_norm_l2_grad(z2, xv - xk, gamma, beta, eps)
    grad_z1 = (grad_z2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
    return grad_z1, x2, grad_z2


@_autocast_off
def ttt_mlp(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_idx: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP over a sequence, mini-batch dual form: the state is a two-layer GELU MLP.

    XQ, XK, XV: [B, H, T, D]; eta: [B, H, T]; W1: [B, H, D, F], b1: [B, H, 1, F],
    W2: [B, H, F, D], b2: [B, H, 1, D] with F = 4D by convention; ln_weight, ln_bias: [H, D].
    Returns Z: [B, H, T, D] and the final W1, b1, W2, b2.
    """
    token_idx = _check_inputs(
        XQ, XK, XV, eta, {"W1": W1, "b1": b1, "W2": W2, "b2": b2}, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    out_dtype, (XQ, XK, XV, eta) = XQ.dtype, _in_dtype(W1.dtype, XQ, XK, XV, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    outputs = []
    for start, end in _mini_batches(XQ.shape[2], mini_batch_size):
        xq, xk, xv = XQ[:, :, start:end], XK[:, :, start:end], XV[:, :, start:end]
        e = torch.tril(token_idx[: end - start, None] * eta[:, :, None, start:end])
        grad_z1, x2, grad_z2 = _mlp_grads(xk, xv, W1, b1, W2, b2, gamma, beta, eps)
        # each layer's weights at token i are its start weights minus e-weighted outer products
        z1 = xq @ W1 + b1 - (e * (xq @ xk.transpose(-1, -2))) @ grad_z1 - e @ grad_z1
        h = gelu_tanh(z1)
        z2 = h @ W2 + b2 - (e * (h @ x2.transpose(-1, -2))) @ grad_z2 - e @ grad_z2
        outputs.append(xq + layer_norm(z2, gamma, beta, eps))
        e_last = e[:, :, -1:, :].transpose(-1, -2)  # [B, H, n, 1]
        W1 = W1 - xk.transpose(-1, -2) @ (e_last * grad_z1)
        b1 = b1 - (e_last * grad_z1).sum(2, keepdim=True)
        W2 = W2 - x2.transpose(-1, -2) @ (e_last * grad_z2)
        b2 = b2 - (e_last * grad_z2).sum(2, keepdim=True)
    return torch.cat(outputs, dim=2).to(out_dtype), W1, b1, W2, b2


@_autocast_off
def ttt_mlp_step(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_idx: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """One token of TTT-MLP in the primal form; like `ttt_linear_step` with
    state = (W1, b1, W2, b2, grad_W1, grad_b1, grad_W2, grad_b2)."""
    _check_step(xq, state, position, token_idx, 8)
    W1, b1, W2, b2, gW1, gb1, gW2, gb2 = state
    out_dtype, (xq, xk, xv, eta) = xq.dtype, _in_dtype(W1.dtype, xq, xk, xv, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    grad_z1, x2, grad_z2 = _mlp_grads(xk, xv, W1, b1, W2, b2, gamma, beta, eps)
    lr = eta[:, :, None, None]
    gW1 = gW1 + lr * (xk.transpose(-1, -2) @ grad_z1)
    gb1 = gb1 + lr * grad_z1
    gW2 = gW2 + lr * (x2.transpose(-1, -2) @ grad_z2)
    gb2 = gb2 + lr * grad_z2
    s = _step_scale(token_idx, position)
    *_, f = _mlp_forward(xq, W1 - s * gW1, b1 - s * gb1, W2 - s * gW2, b2 - s * gb2)
    z = xq + layer_norm(f, gamma, beta, eps)
    return z.to(out_dtype), (W1, b1, W2, b2, gW1, gb1, gW2, gb2)


@_autocast_off
def ttt_mlp_primal(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_idx: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TTT-MLP token by token (primal form); same arguments and results as `ttt_mlp`."""
    token_idx = _check_inputs(
        XQ, XK, XV, eta, {"W1": W1, "b1": b1, "W2": W2, "b2": b2}, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    Z, state = _primal_loop(
        ttt_mlp_step, XQ, XK, XV, eta, (W1, b1, W2, b2), ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    return Z, *state


# ---------------------------------------------------------------- any split of a sequence

_FORMS = {"linear": (ttt_linear, ttt_linear_step), "mlp": (ttt_mlp, ttt_mlp_step)}


def decode_step(
    kind: str,
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_idx: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """One decoded token, what the decode kernels compute: the step (`ttt_linear_step` or
    `ttt_mlp_step`, by kind), then `commit_state` for each row whose token closes its mini-batch.

    position: an int, or a tensor [B] with each row's own position (rows of a batch whose prompts
    had different lengths). Returns z: [B, H, 1, D] and the new state.
    """
    if kind not in _FORMS:
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
    z, state = _FORMS[kind][1](xq, xk, xv, eta, state, position, ln_weight, ln_bias, token_idx, eps)
    closes = position == token_idx.numel() - 1
    if not isinstance(closes, Tensor):
        return z, commit_state(state, token_idx[-1]) if closes else state
    committed = commit_state(state, token_idx[-1])
    closes = closes.view(-1, 1, 1, 1)
    return z, tuple(torch.where(closes, c, s) for c, s in zip(committed, state))


def ttt_continue(
    kind: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    state: State,
    position: int,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_idx: Tensor | None = None,
    eps: float = 1e-6,
    *,
    dual: Callable[..., tuple[Tensor, ...]] | None = None,
) -> tuple[Tensor, State, int]:
    """Continue a sequence from any point, also inside a mini-batch (prefill, then decode).

    kind: "linear" or "mlp". state = (*params, *grads) as in `ttt_linear_step`; position: how many
    tokens of the current mini-batch were already read (0 at a boundary, where grads are zero),
    or for one token (T = 1) a tensor [B] of each row's count (then the new position is a tensor too).
    Ragged edges run token by token, whole mini-batches in between in the dual form (`dual`,
    default `ttt_linear` or `ttt_mlp`; a kernel with the same signature can stand in); the result
    is the same as one call over the whole sequence. Returns Z: [B, H, T, D], the new state and
    the new position.
    """
    token_idx = check_stream(
        kind, XQ, XK, XV, eta, state, position, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    if dual is not None and not callable(dual):
        raise TypeError(f"dual must be a function like ttt_linear or None, got {type(dual).__name__}")
    if isinstance(position, Tensor):
        z, state = decode_step(
            kind, XQ, XK, XV, eta[:, :, 0], tuple(state), position, ln_weight, ln_bias, token_idx, eps
        )
        return z, state, (position + 1) % mini_batch_size
    reference_dual, step = _FORMS[kind]
    dual = reference_dual if dual is None else dual
    state = tuple(state)
    n = len(state) // 2
    T, t, outputs = XQ.shape[2], 0, []

    def steps_until(stop: int) -> None:
        nonlocal state, position, t
        for s in range(t, stop):
            tok = slice(s, s + 1)
            z, state = step(
                XQ[:, :, tok],
                XK[:, :, tok],
                XV[:, :, tok],
                eta[:, :, s],
                state,
                position,
                ln_weight,
                ln_bias,
                token_idx,
                eps,
            )
            outputs.append(z)
            position += 1
            if position == mini_batch_size:
                state, position = commit_state(state, token_idx[-1]), 0
        t = stop

    if position:
        steps_until(min(T, t + mini_batch_size - position))
    whole = (T - t) // mini_batch_size * mini_batch_size
    if whole:
        span = slice(t, t + whole)
        Z, *params = dual(
            XQ[:, :, span],
            XK[:, :, span],
            XV[:, :, span],
            eta[:, :, span],
            *state[:n],
            ln_weight,
            ln_bias,
            mini_batch_size,
            token_idx,
            eps,
        )
        state = tuple(params) + state[n:]
        outputs.append(Z)
        t += whole
    steps_until(T)
    return torch.cat(outputs, dim=2), state, position

"""The TTT update rule as pure functions on tensors: the reference every kernel is checked against.

`ttt_linear` and `ttt_mlp` compute a whole sequence in the mini-batch dual form (matrix
products, what the kernels compute). `ttt_linear_primal` and `ttt_mlp_primal` compute the
same outputs token by token with `ttt_linear_step` / `ttt_mlp_step`, the rule a decoder
follows, and `commit_state` at the end of each mini-batch.

Shapes: B batch, H heads, T tokens, D head dim, b = mini_batch_size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .checks import check_inputs, check_step
from .kinds import KINDS, State
from .mini_batch import mini_batches, step_scale


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


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """Derivative of `gelu_tanh` at x."""
    k = math.sqrt(2.0 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)


def _mlp_forward(x: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """f(x) = gelu(x W1 + b1) W2 + b2; returns the pre-activation, the hidden activation and f(x)."""
    z1 = x @ W1 + b1
    x2 = gelu_tanh(z1)
    return z1, x2, x2 @ W2 + b2


def inner_model(x: Tensor, *params: Tensor) -> Tensor:
    """The inner model f(x) of a state: x W + b for (W, b), gelu(x W1 + b1) W2 + b2 for
    (W1, b1, W2, b2). x: [B, H, n, D] -> [B, H, n, D]"""
    if len(params) == 2:
        W, b = params
        return x @ W + b
    return _mlp_forward(x, *params)[2]


def inner_loss(XK: Tensor, XV: Tensor, *state_and_norm: Tensor, eps: float = 1e-6) -> Tensor:
    """Self-supervised loss `0.5 * ||LN(f(XK)) - (XV - XK)||^2` of a state, per token.

    state_and_norm: the state, W [B, H, D, D], b [B, H, 1, D] (TTT-Linear) or W1, b1, W2, b2
    (TTT-MLP), then ln_weight, ln_bias [H, D]. XK, XV: [B, H, T, D]. Returns [B, H, T].
    """
    *params, ln_weight, ln_bias = state_and_norm
    if len(params) not in (2, 4):
        raise ValueError(f"inner_loss takes W, b or W1, b1, W2, b2, then ln_weight, ln_bias; got {len(params)} tensors")
    w, c = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    return 0.5 * (layer_norm(inner_model(XK, *params), w, c, eps) - (XV - XK)).pow(2).sum(-1)


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
    token_idx = check_inputs(
        KINDS["linear"], XQ, XK, XV, eta, {"W0": W0, "b0": b0}, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    out_dtype, (XQ, XK, XV, eta) = XQ.dtype, _in_dtype(W0.dtype, XQ, XK, XV, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    W, b = W0, b0
    outputs = []
    for start, end in mini_batches(XQ.shape[2], mini_batch_size):
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
    check_step(xq, state, position, token_idx, 4)
    W, b, grad_W, grad_b = state
    out_dtype, (xq, xk, xv, eta) = xq.dtype, _in_dtype(W.dtype, xq, xk, xv, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    g = layer_norm_l2_grad(xk @ W + b, xv - xk, gamma, beta, eps)  # gradient at the mini-batch start
    lr = eta[:, :, None, None]
    grad_W = grad_W + lr * (xk.transpose(-1, -2) @ g)
    grad_b = grad_b + lr * g
    scale = step_scale(token_idx, position)
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
    return _primal("linear", XQ, XK, XV, eta, (W0, b0), ln_weight, ln_bias, mini_batch_size, token_idx, eps)


def _primal(
    name: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    params: State,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    eps: float,
) -> State:
    """The primal form of kind `name`: its step over every token, committing the state at the end
    of each mini-batch. Returns Z and the final parameters."""
    kind = KINDS[name]
    named = dict(zip(kind.params, params))
    token_idx = check_inputs(kind, XQ, XK, XV, eta, named, ln_weight, ln_bias, mini_batch_size, token_idx, eps)
    state = tuple(params) + tuple(torch.zeros_like(p) for p in params)
    outputs = []
    for start, end in mini_batches(XQ.shape[2], mini_batch_size):
        for t in range(start, end):
            tok = slice(t, t + 1)
            z, state = kind.step(
                XQ[:, :, tok], XK[:, :, tok], XV[:, :, tok], eta[:, :, t], state, t - start,
                ln_weight, ln_bias, token_idx, eps,
            )  # fmt: skip
            outputs.append(z)
        state = commit_state(state, token_idx[end - start - 1])
    return torch.cat(outputs, dim=2), *state[: len(params)]


# ---------------------------------------------------------------- TTT-MLP


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
    state = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    token_idx = check_inputs(KINDS["mlp"], XQ, XK, XV, eta, state, ln_weight, ln_bias, mini_batch_size, token_idx, eps)
    out_dtype, (XQ, XK, XV, eta) = XQ.dtype, _in_dtype(W1.dtype, XQ, XK, XV, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    outputs = []
    for start, end in mini_batches(XQ.shape[2], mini_batch_size):
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
    check_step(xq, state, position, token_idx, 8)
    W1, b1, W2, b2, gW1, gb1, gW2, gb2 = state
    out_dtype, (xq, xk, xv, eta) = xq.dtype, _in_dtype(W1.dtype, xq, xk, xv, eta)
    gamma, beta = ln_weight[None, :, None, :], ln_bias[None, :, None, :]
    grad_z1, x2, grad_z2 = _mlp_grads(xk, xv, W1, b1, W2, b2, gamma, beta, eps)
    lr = eta[:, :, None, None]
    gW1 = gW1 + lr * (xk.transpose(-1, -2) @ grad_z1)
    gb1 = gb1 + lr * grad_z1
    gW2 = gW2 + lr * (x2.transpose(-1, -2) @ grad_z2)
    gb2 = gb2 + lr * grad_z2
    s = step_scale(token_idx, position)
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
    return _primal("mlp", XQ, XK, XV, eta, (W1, b1, W2, b2), ln_weight, ln_bias, mini_batch_size, token_idx, eps)

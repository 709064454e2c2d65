"""Triton kernels that time the latency of the operations one TTT-Linear mini-batch step chains:
a single program repeats one operation N times, each repetition reading the last one's result,
on [b, D] tiles held in registers as the prefill kernel holds them."""

from __future__ import annotations

import triton
import triton.language as tl

from ttt_helpers.kernels.triton_ttt_linear import dot, ln_l2_grad, reduce_sum


@triton.jit
def dot_chain_kernel(X, W, OUT, N, D: tl.constexpr, MB: tl.constexpr, PRECISION: tl.constexpr):
    """N dependent [MB, D] x [D, D] products: x <- x W."""
    rows = tl.arange(0, MB)
    cols = tl.arange(0, D)
    x = tl.load(X + rows[:, None] * D + cols[None, :])
    w = tl.load(W + cols[:, None] * D + cols[None, :])
    for _ in range(N):
        x = dot(x, w, PRECISION)
    tl.store(OUT + rows[:, None] * D + cols[None, :], x)


@triton.jit
def sum_chain_kernel(X, OUT, N, D: tl.constexpr, MB: tl.constexpr, AXIS: tl.constexpr):
    """N dependent reductions of an [MB, D] tile along AXIS (1: each row over D; 0: over the rows),
    each broadcast back: x <- x - sum(x) / 64."""
    rows = tl.arange(0, MB)
    cols = tl.arange(0, D)
    x = tl.load(X + rows[:, None] * D + cols[None, :])
    for _ in range(N):
        x = x - tl.expand_dims(reduce_sum(x, axis=AXIS), AXIS) * 0.015625
    tl.store(OUT + rows[:, None] * D + cols[None, :], x)


@triton.jit
def ln_grad_chain_kernel(X, T, OUT, N, D: tl.constexpr, MB: tl.constexpr):
    """N dependent gradients of the inner loss through the LayerNorm: x <- LN-L2-grad(x, target)."""
    rows = tl.arange(0, MB)
    cols = tl.arange(0, D)
    x = tl.load(X + rows[:, None] * D + cols[None, :])
    target = tl.load(T + rows[:, None] * D + cols[None, :])
    gamma = tl.full((D,), 1.0, tl.float32)
    beta = tl.zeros((D,), tl.float32)
    for _ in range(N):
        x = ln_l2_grad(x, target, gamma, beta, D, 1e-6)
    tl.store(OUT + rows[:, None] * D + cols[None, :], x)


@triton.jit
def recurrence_chain_kernel(
    XK, XV, W0, OUT, N, D: tl.constexpr, MB: tl.constexpr, W_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr
):
    """N steps of the state's recurrence alone, on one mini-batch's inputs: z = xk W, the LN-L2
    gradient, W <- W - xk^T (e grad). What a step cannot do without, with no output computed."""
    rows = tl.arange(0, MB)
    cols = tl.arange(0, D)
    xk = tl.load(XK + rows[:, None] * D + cols[None, :])
    target = tl.load(XV + rows[:, None] * D + cols[None, :]).to(tl.float32) - xk.to(tl.float32)
    W = tl.load(W0 + cols[:, None] * D + cols[None, :])
    gamma = tl.full((D,), 1.0, tl.float32)
    beta = tl.zeros((D,), tl.float32)
    for _ in range(N):
        grad = ln_l2_grad(dot(xk, W, W_PRECISION), target, gamma, beta, D, 1e-6)
        W -= dot(tl.trans(xk), grad * 0.001, GRAD_PRECISION)
    tl.store(OUT + cols[:, None] * D + cols[None, :], W)

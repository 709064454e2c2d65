"""The Triton programs behind `ttt_helpers.kernels.ttt_mlp`; import this module only through it.

A TTT-MLP state per head is W1 [D, F], b1 [F], W2 [F, D], b2 [D] with F = 4D: 8 D^2 + 5 D
floats with the gradient sums of the decode step, 128 KB in float32 at D = 64. That does not fit
in one program's registers, so the weights stay in global memory (float32, in place; at the sizes
of a model they stay in the GPU's L2 cache) and each product streams them through registers FB
columns of F at a time. Only b2, the mini-batch's inputs and [b, D] intermediates stay on chip.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_ttt_linear import _dot, _ln_l2_grad, _position, _residual_ln, _store_state, _sum

_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), a constexpr: the only globals a kernel may read


@triton.jit
def _gelu_tanh_term(x):
    """tanh(sqrt(2/pi) (x + 0.044715 x^3)), written with tl.exp (a builtin, unlike tl.sigmoid)."""
    u = _K * (x + 0.044715 * x * x * x)
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def _gelu(x):
    """GELU with the tanh approximation (ops.gelu_tanh)."""
    return 0.5 * x * (1.0 + _gelu_tanh_term(x))


@triton.jit
def _gelu_grad(x):
    """Derivative of _gelu (ops.gelu_tanh_grad)."""
    t = _gelu_tanh_term(x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _K * (1.0 + 0.134145 * x * x)


@triton.jit
def ttt_mlp_prefill_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W1,
    B1,
    W2,
    B2,
    LN_W,
    LN_B,
    TOKEN_IDX,
    Z,
    T,
    H,
    eps,
    sx_b,
    sx_h,
    sx_t,  # strides of XQ, XK, XV (last dim contiguous)
    sz_b,
    sz_h,
    sz_t,  # strides of Z (last dim contiguous)
    se_b,
    se_h,
    se_t,  # strides of eta
    D: tl.constexpr,
    F: tl.constexpr,
    FB: tl.constexpr,
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
):
    """TTT-MLP over a whole sequence for one (batch, head): program id = batch * H + head.

    XQ, XK, XV, Z: [B, H, T, D]; ETA: [B, H, T]; W1: [B, H, D, F], B1: [B, H, 1, F],
    W2: [B, H, F, D], B2: [B, H, 1, D], float32 and contiguous: the initial state, overwritten
    with the final one. Per mini-batch, two passes over the FB-wide chunks of F:
    1. the keys through the inner MLP at the mini-batch's start state, to the output gradient;
    2. per chunk, the hidden gradient, the queries' hidden layer (dual form), their partial
       products with W2, then the chunk's update, written back once every thread has read it.
    Rows past the mini-batch or the sequence get eta = 0, so they move no state; MB, BLOCK_MB and
    the precisions are as in ttt_linear_prefill_kernel.
    """
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    fcols = tl.arange(0, FB)
    w1_ptrs = W1 + pid.to(tl.int64) * D * F + cols[:, None] * F + fcols[None, :]  # chunk f0: + f0
    w2_ptrs = W2 + pid.to(tl.int64) * F * D + fcols[:, None] * D + cols[None, :]  # chunk f0: + f0 * D
    b1_ptrs = B1 + pid.to(tl.int64) * F + fcols

    b2 = tl.load(B2 + pid * D + cols)
    gamma = tl.load(LN_W + hi * D + cols).to(tl.float32)
    beta = tl.load(LN_B + hi * D + cols).to(tl.float32)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(tl.float32)
    causal = rows[None, :] <= rows[:, None]

    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    z_base = bi.to(tl.int64) * sz_b + hi * sz_h
    e_base = bi.to(tl.int64) * se_b + hi * se_h
    for start in range(0, T, MB):
        n = tl.minimum(T - start, MB)
        valid = rows < n
        t = (start + rows).to(tl.int64)
        offs = x_base + t[:, None] * sx_t + cols[None, :]
        xq = tl.load(XQ + offs, mask=valid[:, None], other=0.0)
        xk = tl.load(XK + offs, mask=valid[:, None], other=0.0)
        xv = tl.load(XV + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        eta = tl.load(ETA + e_base + t * se_t, mask=valid, other=0.0).to(tl.float32)
        e = tl.where(causal, token_idx[:, None] * eta[None, :], 0.0)
        e_last = tl.load(TOKEN_IDX + n - 1).to(tl.float32) * eta  # the weights that commit the state

        # pass 1: z2 of the keys, then the gradient of the inner loss at the output layer
        z2k = tl.zeros([BLOCK_MB, D], dtype=tl.float32) + b2[None, :]
        for f0 in range(0, F, FB):
            z1k = _dot(xk, tl.load(w1_ptrs + f0), W_PRECISION) + tl.load(b1_ptrs + f0)[None, :]
            z2k += _dot(_gelu(z1k), tl.load(w2_ptrs + f0 * D), W_PRECISION)
        grad_z2 = _ln_l2_grad(z2k, xv - xk.to(tl.float32), gamma, beta, D, eps)
        weighted2 = e_last[:, None] * grad_z2

        # pass 2: dual form of both layers, chunk by chunk of the hidden width
        # z1_i = xq_i W1 + b1 - sum_{s<=i} e[i, s] (xq_i xk_s^T + 1) grad_z1_s
        # z2_i = h_i W2 + b2 - sum_{s<=i} e[i, s] (h_i x2_s^T + 1) grad_z2_s, h = gelu(z1)
        e_qk = e * (_dot(xq, tl.trans(xk), QK_PRECISION) + 1.0)
        z2q = tl.zeros([BLOCK_MB, D], dtype=tl.float32) + b2[None, :]
        hx2 = tl.zeros([BLOCK_MB, BLOCK_MB], dtype=tl.float32)  # h x2^T, summed over the chunks
        for f0 in range(0, F, FB):
            w1 = tl.load(w1_ptrs + f0)
            b1 = tl.load(b1_ptrs + f0)
            w2 = tl.load(w2_ptrs + f0 * D)
            z1k = _dot(xk, w1, W_PRECISION) + b1[None, :]
            x2k = _gelu(z1k)
            grad_z1 = _dot(grad_z2, tl.trans(w2), W_PRECISION) * _gelu_grad(z1k)
            h = _gelu(_dot(xq, w1, W_PRECISION) + b1[None, :] - _dot(e_qk, grad_z1, GRAD_PRECISION))
            z2q += _dot(h, w2, W_PRECISION)
            hx2 += _dot(h, tl.trans(x2k), GRAD_PRECISION)
            weighted1 = e_last[:, None] * grad_z1
            tl.debug_barrier()  # every thread has read this chunk before it is overwritten
            tl.store(w1_ptrs + f0, w1 - _dot(tl.trans(xk), weighted1, GRAD_PRECISION))
            tl.store(b1_ptrs + f0, b1 - _sum(weighted1, axis=0))
            tl.store(w2_ptrs + f0 * D, w2 - _dot(tl.trans(x2k), weighted2, GRAD_PRECISION))
        tl.debug_barrier()  # the next mini-batch reads the updated weights
        z2q -= _dot(e * (hx2 + 1.0), grad_z2, GRAD_PRECISION)
        b2 -= _sum(weighted2, axis=0)
        out = _residual_ln(xq, z2q, gamma, beta, D, eps)
        tl.store(Z + z_base + t[:, None] * sz_t + cols[None, :], out.to(Z.dtype.element_ty), mask=valid[:, None])

    tl.store(B2 + pid * D + cols, b2)


@triton.jit(do_not_specialize=["pos_value"])  # one compiled program for every position
def ttt_mlp_decode_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W1,
    B1,
    W2,
    B2,
    GW1,
    GB1,
    GW2,
    GB2,
    POS,
    LN_W,
    LN_B,
    TOKEN_IDX,
    Z,
    H,
    pos_value,
    eps,
    sx_b,
    sx_h,  # strides of xq, xk, xv (last dim contiguous)
    se_b,
    se_h,  # strides of eta
    D: tl.constexpr,
    F: tl.constexpr,
    FB: tl.constexpr,
    MB: tl.constexpr,
    POS_FROM_PTR: tl.constexpr,
):
    """One token of TTT-MLP, primal form, for one (batch, head); updates the state in place.

    XQ, XK, XV: [B, H, 1, D]; ETA: [B, H]; the state W1, GW1: [B, H, D, F], B1, GB1: [B, H, 1, F],
    W2, GW2: [B, H, F, D], B2, GB2: [B, H, 1, D], contiguous (weights at the mini-batch start and
    eta-weighted gradient sums); Z: [B, H, 1, D]. POS, pos_value, POS_FROM_PTR as in
    ttt_linear_decode_kernel. Two passes over FB-wide chunks of F: the keys' output gradient, then
    per chunk the hidden gradient, the gradient sums, the prediction and (last position) the commit.
    """
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    cols = tl.arange(0, D)
    fcols = tl.arange(0, FB)
    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    w1_offs = pid.to(tl.int64) * D * F + cols[:, None] * F + fcols[None, :]  # chunk f0: + f0
    w2_offs = pid.to(tl.int64) * F * D + fcols[:, None] * D + cols[None, :]  # chunk f0: + f0 * D
    b1_offs = pid.to(tl.int64) * F + fcols
    pos = _position(POS, pos_value, POS_FROM_PTR)
    scale = tl.load(TOKEN_IDX + pos).to(tl.float32)
    eta = tl.load(ETA + bi * se_b + hi * se_h).to(tl.float32)
    gamma = tl.load(LN_W + hi * D + cols).to(tl.float32)
    beta = tl.load(LN_B + hi * D + cols).to(tl.float32)
    xq = tl.load(XQ + x_base + cols).to(tl.float32)
    xk = tl.load(XK + x_base + cols).to(tl.float32)
    xv = tl.load(XV + x_base + cols).to(tl.float32)
    b2 = tl.load(B2 + pid * D + cols).to(tl.float32)
    grad_b2 = tl.load(GB2 + pid * D + cols).to(tl.float32)

    # pass 1: the key through the MLP at the mini-batch's start state, to the output gradient
    z2 = b2
    for f0 in range(0, F, FB):
        w1 = tl.load(W1 + w1_offs + f0).to(tl.float32)
        z1 = _sum(xk[:, None] * w1, axis=0) + tl.load(B1 + b1_offs + f0).to(tl.float32)
        w2 = tl.load(W2 + w2_offs + f0 * D).to(tl.float32)
        z2 += _sum(_gelu(z1)[:, None] * w2, axis=0)
    g2 = _sum(_ln_l2_grad(z2[None, :], (xv - xk)[None, :], gamma, beta, D, eps), axis=0)

    # pass 2: gradient sums, the prediction with params - scale * sums, the commit at the last position
    commit = pos == MB - 1
    grad_b2 += eta * g2
    b2_eff = b2 - scale * grad_b2
    f = b2_eff
    for f0 in range(0, F, FB):
        w1 = tl.load(W1 + w1_offs + f0).to(tl.float32)
        gw1 = tl.load(GW1 + w1_offs + f0).to(tl.float32)
        b1 = tl.load(B1 + b1_offs + f0).to(tl.float32)
        gb1 = tl.load(GB1 + b1_offs + f0).to(tl.float32)
        w2 = tl.load(W2 + w2_offs + f0 * D).to(tl.float32)
        gw2 = tl.load(GW2 + w2_offs + f0 * D).to(tl.float32)
        z1 = _sum(xk[:, None] * w1, axis=0) + b1
        g1 = _sum(w2 * g2[None, :], axis=1) * _gelu_grad(z1)
        gw1 += eta * xk[:, None] * g1[None, :]
        gb1 += eta * g1
        gw2 += eta * _gelu(z1)[:, None] * g2[None, :]
        w1_eff = w1 - scale * gw1
        b1_eff = b1 - scale * gb1
        w2_eff = w2 - scale * gw2
        h = _gelu(_sum(xq[:, None] * w1_eff, axis=0) + b1_eff)
        f += _sum(h[:, None] * w2_eff, axis=0)
        # a commit starts the next mini-batch from the updated weights with empty sums
        _store_state(W1, GW1, w1_offs + f0, w1_eff, gw1, commit)
        _store_state(B1, GB1, b1_offs + f0, b1_eff, gb1, commit)
        _store_state(W2, GW2, w2_offs + f0 * D, w2_eff, gw2, commit)
    _store_state(B2, GB2, pid * D + cols, b2_eff, grad_b2, commit)

    out = _sum(_residual_ln(xq[None, :], f[None, :], gamma, beta, D, eps), axis=0)
    tl.store(Z + pid * D + cols, out.to(Z.dtype.element_ty))

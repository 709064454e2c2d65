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

from .triton_ttt_linear import (
    _ln_l2_grad_bwd,
    _normalize,
    _normalize_bwd,
    _position,
    _store_state,
    dot,
    ln_l2_grad,
    reduce_sum,
    residual_ln,
)

_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), a constexpr: the only globals a kernel may read


@triton.jit
def _gelu_tanh_term(x):
    """tanh(sqrt(2/pi) (x + 0.044715 x^3)), written with tl.exp (a builtin, unlike tl.sigmoid)."""
    u = _K * (x + 0.044715 * x * x * x)
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def gelu(x):
    """GELU with the tanh approximation (ops.gelu_tanh)."""
    return 0.5 * x * (1.0 + _gelu_tanh_term(x))


@triton.jit
def gelu_grad(x):
    """Derivative of gelu (ops.gelu_tanh_grad)."""
    t = _gelu_tanh_term(x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _K * (1.0 + 0.134145 * x * x)


@triton.jit
def _gelu_grad2(x):
    """Second derivative of gelu. With t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3):
    gelu' = (1 + t) / 2 + x (1 - t^2) u' / 2, so gelu'' = (1 - t^2) (u' + x u'' / 2 - x t u'^2)."""
    t = _gelu_tanh_term(x)
    du = _K * (1.0 + 0.134145 * x * x)
    return (1.0 - t * t) * (du + 0.134145 * _K * x * x - x * t * du * du)


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
    SAVE_STATES: tl.constexpr,
    ACC: tl.constexpr,
):
    """TTT-MLP over a whole sequence for one (batch, head): program id = batch * H + head.

    XQ, XK, XV, Z: [B, H, T, D]; ETA: [B, H, T]; W1: [B, H, D, F], B1: [B, H, 1, F],
    W2: [B, H, F, D], B2: [B, H, 1, D], in ACC (float32; float64 for float64 inputs) and
    contiguous: the initial state, overwritten with the final one. With SAVE_STATES (the training
    forward) each holds NC + 1 states per head instead, [B, H, NC + 1, ...] for NC mini-batches:
    mini-batch c reads slot c (its start state, filled in for c = 0) and writes slot c + 1, so the
    backward finds every start state. Per mini-batch, two passes over the FB-wide chunks of F:
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
    NC = tl.cdiv(T, MB)
    slots = NC + 1 if SAVE_STATES else 1
    base = pid.to(tl.int64) * slots
    w1_ptrs = W1 + base * D * F + cols[:, None] * F + fcols[None, :]  # chunk f0: + f0
    w2_ptrs = W2 + base * F * D + fcols[:, None] * D + cols[None, :]  # chunk f0: + f0 * D
    b1_ptrs = B1 + base * F + fcols
    b2_ptrs = B2 + base * D + cols

    b2 = tl.load(b2_ptrs)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    beta = tl.load(LN_B + hi * D + cols).to(ACC)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(ACC)
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
        xv = tl.load(XV + offs, mask=valid[:, None], other=0.0).to(ACC)
        eta = tl.load(ETA + e_base + t * se_t, mask=valid, other=0.0).to(ACC)
        e = tl.where(causal, token_idx[:, None] * eta[None, :], 0.0)
        e_last = tl.load(TOKEN_IDX + n - 1).to(ACC) * eta  # the weights that commit the state
        src = start // MB if SAVE_STATES else 0  # the state slot read; the update goes to slot dst
        dst = src + 1 if SAVE_STATES else 0

        # pass 1: z2 of the keys, then the gradient of the inner loss at the output layer
        z2k = tl.zeros([BLOCK_MB, D], dtype=ACC) + b2[None, :]
        for f0 in range(0, F, FB):
            z1k = dot(xk, tl.load(w1_ptrs + src * D * F + f0), W_PRECISION) + tl.load(b1_ptrs + src * F + f0)[None, :]
            z2k += dot(gelu(z1k), tl.load(w2_ptrs + src * F * D + f0 * D), W_PRECISION)
        grad_z2 = ln_l2_grad(z2k, xv - xk.to(ACC), gamma, beta, D, eps)
        weighted2 = e_last[:, None] * grad_z2

        # pass 2: dual form of both layers, chunk by chunk of the hidden width
        # z1_i = xq_i W1 + b1 - sum_{s<=i} e[i, s] (xq_i xk_s^T + 1) grad_z1_s
        # z2_i = h_i W2 + b2 - sum_{s<=i} e[i, s] (h_i x2_s^T + 1) grad_z2_s, h = gelu(z1)
        e_qk = e * (dot(xq, tl.trans(xk), QK_PRECISION) + 1.0)
        z2q = tl.zeros([BLOCK_MB, D], dtype=ACC) + b2[None, :]
        hx2 = tl.zeros([BLOCK_MB, BLOCK_MB], dtype=ACC)  # h x2^T, summed over the chunks
        for f0 in range(0, F, FB):
            w1 = tl.load(w1_ptrs + src * D * F + f0)
            b1 = tl.load(b1_ptrs + src * F + f0)
            w2 = tl.load(w2_ptrs + src * F * D + f0 * D)
            z1k = dot(xk, w1, W_PRECISION) + b1[None, :]
            x2k = gelu(z1k)
            grad_z1 = dot(grad_z2, tl.trans(w2), W_PRECISION) * gelu_grad(z1k)
            h = gelu(dot(xq, w1, W_PRECISION) + b1[None, :] - dot(e_qk, grad_z1, GRAD_PRECISION))
            z2q += dot(h, w2, W_PRECISION)
            hx2 += dot(h, tl.trans(x2k), GRAD_PRECISION)
            weighted1 = e_last[:, None] * grad_z1
            tl.debug_barrier()  # every thread has read this chunk before it is overwritten
            tl.store(w1_ptrs + dst * D * F + f0, w1 - dot(tl.trans(xk), weighted1, GRAD_PRECISION))
            tl.store(b1_ptrs + dst * F + f0, b1 - reduce_sum(weighted1, axis=0))
            tl.store(w2_ptrs + dst * F * D + f0 * D, w2 - dot(tl.trans(x2k), weighted2, GRAD_PRECISION))
        tl.debug_barrier()  # the next mini-batch reads the updated weights
        z2q -= dot(e * (hx2 + 1.0), grad_z2, GRAD_PRECISION)
        b2 -= reduce_sum(weighted2, axis=0)
        if SAVE_STATES:
            tl.store(b2_ptrs + dst * D, b2)
        out = residual_ln(xq, z2q, gamma, beta, D, eps)
        tl.store(Z + z_base + t[:, None] * sz_t + cols[None, :], out.to(Z.dtype.element_ty), mask=valid[:, None])

    if not SAVE_STATES:
        tl.store(b2_ptrs, b2)


@triton.jit
def ttt_mlp_backward_kernel(
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
    DZ,  # inputs: the forward's, its NC + 1 saved states per head, the gradient of Z
    DW1,
    DB1,
    DW2,
    DB2,  # in: the gradient of the final state; out: that of the initial state
    DXQ,
    DXK,
    DXV,
    DETA,
    DLN_W,
    DLN_B,
    DTOKEN_IDX,  # outputs
    T,
    H,
    eps,
    sx_b,
    sx_h,
    sx_t,  # strides of XQ, XK, XV (last dim contiguous)
    sd_b,
    sd_h,
    sd_t,  # strides of DZ
    sg_b,
    sg_h,
    sg_t,  # strides of DXQ, DXK, DXV
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
    ACC: tl.constexpr,
):
    """Backward of ttt_mlp_prefill_kernel for one (batch, head), mini-batches in reverse.

    W1 [B, H, NC + 1, D, F], B1 [B, H, NC + 1, F], W2 [B, H, NC + 1, F, D], B2 [B, H, NC + 1, D]:
    the states the forward saved (slot c starts mini-batch c). DW1 [B, H, D, F], DB1 [B, H, F],
    DW2 [B, H, F, D], DB2 [B, H, D] (ACC, contiguous) carry the adjoint of the state, in global
    memory like the state itself, updated chunk by chunk; the outputs are as in
    ttt_linear_backward_kernel. Why four passes over the FB-wide chunks of F per mini-batch,
    with x2 = gelu(z1k), z1k = xk W1 + b1, grad_z1 = (grad_z2 W2^T) gelu'(z1k), h = gelu(z1q):
    A. z2k = x2 W2 + b2 sums over F: then grad_z2 = LN-L2-grad(z2k);
    B. z2q = h W2 + b2 - (e (h x2^T + 1)) grad_z2 and x2 dW2' sum over F: then out's backward
       gives dz2q, and the adjoint of grad_z2 gets all but its path through grad_z1;
    C. per chunk, everything whose only link across chunks is a sum: dh, dz1q, the paths into
       grad_z1 and from it into grad_z2 and gelu'(z1k), their terms of dW1, db1, dW2, dxq, dxk;
    D. with grad_z2's adjoint complete, dz2k from the closed form's backward, then its terms
       through x2 into dW2, and through z1k into dW1, db1 and dxk.
    A barrier separates the passes: a chunk's adjoint written in one is read in the next.
    """
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    fcols = tl.arange(0, FB)
    NC = tl.cdiv(T, MB)
    w1_offs = cols[:, None] * F + fcols[None, :]  # chunk f0: + f0
    w2_offs = fcols[:, None] * D + cols[None, :]  # chunk f0: + f0 * D
    dw1_ptrs = DW1 + pid.to(tl.int64) * D * F + w1_offs
    dw2_ptrs = DW2 + pid.to(tl.int64) * F * D + w2_offs
    db1_ptrs = DB1 + pid.to(tl.int64) * F + fcols
    db2 = tl.load(DB2 + pid * D + cols)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    beta = tl.load(LN_B + hi * D + cols).to(ACC)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(ACC)
    causal = rows[None, :] <= rows[:, None]
    dgamma = tl.zeros([D], dtype=ACC)
    dbeta = tl.zeros([D], dtype=ACC)
    dtoken_idx = tl.zeros([BLOCK_MB], dtype=ACC)

    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    d_base = bi.to(tl.int64) * sd_b + hi * sd_h
    g_base = bi.to(tl.int64) * sg_b + hi * sg_h
    e_base = bi.to(tl.int64) * se_b + hi * se_h
    for step in range(0, NC):
        c = NC - 1 - step
        start = c * MB
        n = tl.minimum(T - start, MB)
        valid = rows < n
        t = (start + rows).to(tl.int64)
        offs = x_base + t[:, None] * sx_t + cols[None, :]
        xq = tl.load(XQ + offs, mask=valid[:, None], other=0.0)
        xk = tl.load(XK + offs, mask=valid[:, None], other=0.0)
        target = tl.load(XV + offs, mask=valid[:, None], other=0.0).to(ACC) - xk.to(ACC)
        eta = tl.load(ETA + e_base + t * se_t, mask=valid, other=0.0).to(ACC)
        dout = tl.load(DZ + d_base + t[:, None] * sd_t + cols[None, :], mask=valid[:, None], other=0.0).to(ACC)
        slot = pid.to(tl.int64) * (NC + 1) + c
        w1_ptrs = W1 + slot * D * F + w1_offs
        w2_ptrs = W2 + slot * F * D + w2_offs
        b1_ptrs = B1 + slot * F + fcols
        b2 = tl.load(B2 + slot * D + cols)
        e = tl.where(causal, token_idx[:, None] * eta[None, :], 0.0)
        attn1 = dot(xq, tl.trans(xk), QK_PRECISION) + 1.0
        E1 = e * attn1
        tau_last = tl.load(TOKEN_IDX + n - 1).to(ACC)
        e_last = tau_last * eta

        # pass A: the keys through the MLP, to grad_z2
        z2k = tl.zeros([BLOCK_MB, D], dtype=ACC) + b2[None, :]
        for f0 in range(0, F, FB):
            z1k = dot(xk, tl.load(w1_ptrs + f0), W_PRECISION) + tl.load(b1_ptrs + f0)[None, :]
            z2k += dot(gelu(z1k), tl.load(w2_ptrs + f0 * D), W_PRECISION)
        grad_z2 = ln_l2_grad(z2k, target, gamma, beta, D, eps)

        # pass B: the queries' output z2q, h x2^T and x2 dW2'
        z2q = tl.zeros([BLOCK_MB, D], dtype=ACC) + b2[None, :]
        hx2 = tl.zeros([BLOCK_MB, BLOCK_MB], dtype=ACC)
        x2_dw2 = tl.zeros([BLOCK_MB, D], dtype=ACC)
        for f0 in range(0, F, FB):
            w1 = tl.load(w1_ptrs + f0)
            b1 = tl.load(b1_ptrs + f0)
            w2 = tl.load(w2_ptrs + f0 * D)
            z1k = dot(xk, w1, W_PRECISION) + b1[None, :]
            x2 = gelu(z1k)
            grad_z1 = dot(grad_z2, tl.trans(w2), W_PRECISION) * gelu_grad(z1k)
            h = gelu(dot(xq, w1, W_PRECISION) + b1[None, :] - dot(E1, grad_z1, GRAD_PRECISION))
            z2q += dot(h, w2, W_PRECISION)
            hx2 += dot(h, tl.trans(x2), GRAD_PRECISION)
            x2_dw2 += dot(x2, tl.load(dw2_ptrs + f0 * D), GRAD_PRECISION)
        attn2 = hx2 + 1.0
        E2 = e * attn2
        z2q -= dot(E2, grad_z2, GRAD_PRECISION)

        # out = xq + LN(z2q); z2q = h W2 + b2 - E2 grad_z2, E2 = e (h x2^T + 1); the commit of W2, b2
        z_hat, rstd = _normalize(z2q, D, eps)
        dgamma += reduce_sum(dout * z_hat, axis=0)
        dbeta += reduce_sum(dout, axis=0)
        dz2q = _normalize_bwd(dout * gamma[None, :], z_hat, rstd, D)
        dE2 = -dot(dz2q, tl.trans(grad_z2), GRAD_PRECISION)
        de = tl.where(causal, dE2 * attn2, 0.0)
        dP = dE2 * e  # adjoint of h x2^T
        du2 = -(x2_dw2 + db2[None, :])  # u2 = e_last grad_z2 leaves W2' = W2 - x2^T u2, b2' = b2 - sum u2
        u2 = e_last[:, None] * grad_z2
        dgrad_z2 = e_last[:, None] * du2 - dot(tl.trans(E2), dz2q, GRAD_PRECISION)
        de_last = reduce_sum(du2 * grad_z2, axis=1)
        dxq = dout
        dxk = tl.zeros([BLOCK_MB, D], dtype=ACC)
        dE1 = tl.zeros([BLOCK_MB, BLOCK_MB], dtype=ACC)

        # pass C: per chunk, through h, z1q = xq W1 + b1 - E1 grad_z1, grad_z1, and the commit of W1, b1
        for f0 in range(0, F, FB):
            w1 = tl.load(w1_ptrs + f0)
            b1 = tl.load(b1_ptrs + f0)
            w2 = tl.load(w2_ptrs + f0 * D)
            dw1 = tl.load(dw1_ptrs + f0)
            db1 = tl.load(db1_ptrs + f0)
            dw2 = tl.load(dw2_ptrs + f0 * D)
            z1k = dot(xk, w1, W_PRECISION) + b1[None, :]
            x2 = gelu(z1k)
            slope = gelu_grad(z1k)
            grad_h = dot(grad_z2, tl.trans(w2), W_PRECISION)  # grad_z1 = grad_h * slope
            grad_z1 = grad_h * slope
            z1q = dot(xq, w1, W_PRECISION) + b1[None, :] - dot(E1, grad_z1, GRAD_PRECISION)
            h = gelu(z1q)
            dh = dot(dz2q, tl.trans(w2), W_PRECISION) + dot(dP, x2, GRAD_PRECISION)
            dz1q = dh * gelu_grad(z1q)
            dxq += dot(dz1q, tl.trans(w1), W_PRECISION)
            dE1 -= dot(dz1q, tl.trans(grad_z1), GRAD_PRECISION)
            du1 = -(dot(xk, dw1, GRAD_PRECISION) + db1[None, :])
            dxk -= dot(e_last[:, None] * grad_z1, tl.trans(dw1), GRAD_PRECISION)
            dgrad_z1 = e_last[:, None] * du1 - dot(tl.trans(E1), dz1q, GRAD_PRECISION)
            de_last += reduce_sum(du1 * grad_z1, axis=1)
            dgrad_h = dgrad_z1 * slope
            dgrad_z2 += dot(dgrad_h, w2, W_PRECISION)
            # z1k's adjoint but for its path through z2k (pass D): via x2 into h x2^T and the
            # commit of W2, and via gelu'(z1k) into grad_z1
            dx2 = dot(tl.trans(dP), h, GRAD_PRECISION) - dot(u2, tl.trans(dw2), GRAD_PRECISION)
            dz1k = dx2 * slope + dgrad_z1 * grad_h * _gelu_grad2(z1k)
            dxk += dot(dz1k, tl.trans(w1), W_PRECISION)
            dw1 += dot(tl.trans(xq), dz1q, GRAD_PRECISION) + dot(tl.trans(xk), dz1k, GRAD_PRECISION)
            db1 += reduce_sum(dz1q, axis=0) + reduce_sum(dz1k, axis=0)
            dw2 += dot(tl.trans(h), dz2q, GRAD_PRECISION) + dot(tl.trans(dgrad_h), grad_z2, GRAD_PRECISION)
            tl.debug_barrier()  # every thread has read this chunk's adjoint before it is overwritten
            tl.store(dw1_ptrs + f0, dw1)
            tl.store(db1_ptrs + f0, db1)
            tl.store(dw2_ptrs + f0 * D, dw2)
        tl.debug_barrier()

        # E1 = e (xq xk^T + 1); grad_z2 = LN-L2-grad(z2k, xv - xk), z2k = x2 W2 + b2
        de += tl.where(causal, dE1 * attn1, 0.0)
        dxq += dot(dE1 * e, xk, GRAD_PRECISION)
        dxk += dot(tl.trans(dE1 * e), xq, GRAD_PRECISION)
        dz2k, dtarget, dgamma_g, dbeta_g = _ln_l2_grad_bwd(dgrad_z2, grad_z2, z2k, target, gamma, beta, D, eps)
        dgamma += dgamma_g
        dbeta += dbeta_g
        dxk -= dtarget
        db2 += reduce_sum(dz2q, axis=0) + reduce_sum(dz2k, axis=0)

        # pass D: dz2k through x2 = gelu(z1k) and W2
        for f0 in range(0, F, FB):
            w1 = tl.load(w1_ptrs + f0)
            w2 = tl.load(w2_ptrs + f0 * D)
            z1k = dot(xk, w1, W_PRECISION) + tl.load(b1_ptrs + f0)[None, :]
            dz1k = dot(dz2k, tl.trans(w2), W_PRECISION) * gelu_grad(z1k)
            dxk += dot(dz1k, tl.trans(w1), W_PRECISION)
            dw1 = tl.load(dw1_ptrs + f0) + dot(tl.trans(xk), dz1k, GRAD_PRECISION)
            db1 = tl.load(db1_ptrs + f0) + reduce_sum(dz1k, axis=0)
            dw2 = tl.load(dw2_ptrs + f0 * D) + dot(tl.trans(gelu(z1k)), dz2k, GRAD_PRECISION)
            tl.debug_barrier()
            tl.store(dw1_ptrs + f0, dw1)
            tl.store(db1_ptrs + f0, db1)
            tl.store(dw2_ptrs + f0 * D, dw2)
        tl.debug_barrier()  # the previous mini-batch reads this adjoint

        # e[i, s] = token_idx[i] eta[s] (s <= i), e_last[s] = token_idx[n - 1] eta[s]
        deta = reduce_sum(de * token_idx[:, None], axis=0) + tau_last * de_last
        dtoken_idx += reduce_sum(de * eta[None, :], axis=1) + tl.where(
            rows == n - 1, reduce_sum(de_last * eta, axis=0), 0.0
        )
        goffs = g_base + t[:, None] * sg_t + cols[None, :]
        tl.store(DXQ + goffs, dxq.to(DXQ.dtype.element_ty), mask=valid[:, None])
        tl.store(DXK + goffs, dxk.to(DXK.dtype.element_ty), mask=valid[:, None])
        tl.store(DXV + goffs, dtarget.to(DXV.dtype.element_ty), mask=valid[:, None])
        tl.store(DETA + pid.to(tl.int64) * T + t, deta.to(DETA.dtype.element_ty), mask=valid)

    tl.store(DB2 + pid * D + cols, db2)
    tl.store(DLN_W + pid * D + cols, dgamma)
    tl.store(DLN_B + pid * D + cols, dbeta)
    tl.store(DTOKEN_IDX + pid * BLOCK_MB + rows, dtoken_idx)


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
    pos_stride,
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
    eta-weighted gradient sums); Z: [B, H, 1, D]. POS, pos_value, pos_stride, POS_FROM_PTR as in
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
    pos = _position(POS, bi, pos_stride, pos_value, POS_FROM_PTR)
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
        z1 = reduce_sum(xk[:, None] * w1, axis=0) + tl.load(B1 + b1_offs + f0).to(tl.float32)
        w2 = tl.load(W2 + w2_offs + f0 * D).to(tl.float32)
        z2 += reduce_sum(gelu(z1)[:, None] * w2, axis=0)
    g2 = reduce_sum(ln_l2_grad(z2[None, :], (xv - xk)[None, :], gamma, beta, D, eps), axis=0)

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
        z1 = reduce_sum(xk[:, None] * w1, axis=0) + b1
        g1 = reduce_sum(w2 * g2[None, :], axis=1) * gelu_grad(z1)
        gw1 += eta * xk[:, None] * g1[None, :]
        gb1 += eta * g1
        gw2 += eta * gelu(z1)[:, None] * g2[None, :]
        w1_eff = w1 - scale * gw1
        b1_eff = b1 - scale * gb1
        w2_eff = w2 - scale * gw2
        h = gelu(reduce_sum(xq[:, None] * w1_eff, axis=0) + b1_eff)
        f += reduce_sum(h[:, None] * w2_eff, axis=0)
        # a commit starts the next mini-batch from the updated weights with empty sums
        _store_state(W1, GW1, w1_offs + f0, w1_eff, gw1, commit)
        _store_state(B1, GB1, b1_offs + f0, b1_eff, gb1, commit)
        _store_state(W2, GW2, w2_offs + f0 * D, w2_eff, gw2, commit)
    _store_state(B2, GB2, pid * D + cols, b2_eff, grad_b2, commit)

    out = reduce_sum(residual_ln(xq[None, :], f[None, :], gamma, beta, D, eps), axis=0)
    tl.store(Z + pid * D + cols, out.to(Z.dtype.element_ty))

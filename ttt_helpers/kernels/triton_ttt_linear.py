"""The Triton programs behind `ttt_helpers.kernels.ttt_linear`; import this module only through it.

It imports triton at the top, so `ttt_linear.py` loads it lazily: on a machine without triton
the rest of the package still imports, and a test can set `TRITON_INTERPRET=1` first.
Every program keeps its state and arithmetic in float32 whatever the input dtype (ACC, which the
training path sets to float64 for float64 inputs: the exact checks of the backward).

Sums go through the builtin tl.reduce rather than tl.sum: tl.sum is itself a @triton.jit
function, which the interpreter cannot call when triton was imported before TRITON_INTERPRET
was set (transformers imports triton, so this happens in a test session). Reducing with
triton's own `_sum_combine` is what tl.sum compiles to on a GPU, and the interpreter
recognises it and sums with numpy; our `_add` stands in if a triton version lacks it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """a @ b with a float32 result. PRECISION "bf16" / "fp16" rounds the operands to that type for
    the tensor cores; "tf32" keeps 10 mantissa bits of float32 operands (tensor cores too); "ieee"
    multiplies in full float32 (no tensor cores: what the float32 path needs for 1e-5); "fp64"
    multiplies in float64 with a float64 result."""
    if PRECISION == "fp64":
        return tl.dot(a.to(tl.float64), b.to(tl.float64))
    elif PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)


@triton.jit
def _add(a, b):
    return a + b


_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    """tl.sum of a float32 tensor through the builtin tl.reduce (see the module docstring)."""
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _normalize(x, D: tl.constexpr, eps):
    """Rows of x: [n, D] standardised over D, and 1/std per row: [n]."""
    mean = reduce_sum(x, axis=1) / D
    xc = x - mean[:, None]
    rstd = 1.0 / tl.sqrt(reduce_sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _ln_l2_grad_parts(z, target, gamma, beta, D: tl.constexpr, eps):
    """ln_l2_grad with the per-row quantities its backward reuses: returns grad, z_hat, rstd,
    g_hat = (gamma z_hat + beta - target) gamma, c1 = mean(g_hat) and c2 = mean(g_hat z_hat);
    grad = rstd (g_hat - c1 - z_hat c2). z, target: [n, D]; gamma, beta: [D]."""
    z_hat, rstd = _normalize(z, D, eps)
    g_hat = (gamma[None, :] * z_hat + beta[None, :] - target) * gamma[None, :]
    c1 = reduce_sum(g_hat, axis=1) / D
    c2 = reduce_sum(g_hat * z_hat, axis=1) / D
    grad = (g_hat - c1[:, None] - z_hat * c2[:, None]) * rstd[:, None]
    return grad, z_hat, rstd, g_hat, c1, c2


@triton.jit
def ln_l2_grad(z, target, gamma, beta, D: tl.constexpr, eps):
    """Gradient w.r.t. z of 0.5 * ||LN(z) - target||^2 per row, in closed form (ops.layer_norm_l2_grad).
    z, target: [n, D]; gamma, beta: [D]."""
    grad, _, _, _, _, _ = _ln_l2_grad_parts(z, target, gamma, beta, D, eps)
    return grad


@triton.jit
def residual_ln(x, z, gamma, beta, D: tl.constexpr, eps):
    """The layer's output x + LN(z) per row, in z's dtype. x, z: [n, D]; gamma, beta: [D]."""
    z_hat, _ = _normalize(z, D, eps)
    return x.to(z.dtype) + z_hat * gamma[None, :] + beta[None, :]


@triton.jit
def _normalize_bwd(dz_hat, z_hat, rstd, D: tl.constexpr):
    """Backward of z_hat = _normalize(z): dz from dz_hat, both [n, D] (1/std depends on z too)."""
    mean = reduce_sum(dz_hat, axis=1) / D
    mean_z = reduce_sum(dz_hat * z_hat, axis=1) / D
    return (dz_hat - mean[:, None] - z_hat * mean_z[:, None]) * rstd[:, None]


@triton.jit
def _ln_l2_grad_bwd_z(dgrad, grad, z_hat, rstd, g_hat, c2, gamma, D: tl.constexpr):
    """Backward of grad = ln_l2_grad(z, ...) w.r.t. z, from the parts _ln_l2_grad_parts returns;
    rows of [n, D]. Returns dz and the adjoint of g_hat, dg_hat (both linear in dgrad).

    Why: grad = rstd (g_hat - c1 - z_hat c2). With q = rstd dgrad, the adjoint of g_hat is
    q - mean(q) - z_hat mean(q z_hat) (the c1, c2 paths); z_hat enters directly through -z_hat c2
    and c2, and through g_hat by gamma^2; the outer rstd adds -rstd z_hat mean(dgrad grad) to dz.
    """
    q = dgrad * rstd[:, None]
    qz = reduce_sum(q * z_hat, axis=1) / D
    dg_hat = q - (reduce_sum(q, axis=1) / D)[:, None] - z_hat * qz[:, None]
    dz_hat = dg_hat * (gamma * gamma)[None, :] - c2[:, None] * q - qz[:, None] * g_hat
    through_rstd = (reduce_sum(dgrad * grad, axis=1) / D * rstd)[:, None] * z_hat
    return _normalize_bwd(dz_hat, z_hat, rstd, D) - through_rstd, dg_hat


@triton.jit
def _ln_l2_grad_bwd(dgrad, grad, z, target, gamma, beta, D: tl.constexpr, eps):
    """Backward of grad = ln_l2_grad(z, target, gamma, beta), given dgrad; rows of [n, D].
    Returns dz, dtarget: [n, D] and dgamma, dbeta: [D] summed over the rows (g_hat is linear in
    target and beta, quadratic in gamma)."""
    _, z_hat, rstd, g_hat, _, c2 = _ln_l2_grad_parts(z, target, gamma, beta, D, eps)
    dz, dg_hat = _ln_l2_grad_bwd_z(dgrad, grad, z_hat, rstd, g_hat, c2, gamma, D)
    dgamma = reduce_sum(dg_hat * (2.0 * gamma[None, :] * z_hat + beta[None, :] - target), axis=0)
    return dz, -dg_hat * gamma[None, :], dgamma, reduce_sum(dg_hat * gamma[None, :], axis=0)


@triton.jit
def _position(POS, row, pos_stride, pos_value, POS_FROM_PTR: tl.constexpr):
    """A decode step's position in its mini-batch for batch row `row`: read from the device
    tensor POS (POS[row] with pos_stride 1, one position for all rows with 0) or passed by value."""
    if POS_FROM_PTR:
        return tl.load(POS + row * pos_stride)
    else:
        return pos_value


@triton.jit
def _store_state(P, G, offs, p_eff, g, commit):
    """A decode step's write of one state tensor P and its gradient sum G at offs: at the
    mini-batch's last position (commit) the updated P and an empty sum, otherwise the sum."""
    if commit:
        tl.store(P + offs, p_eff.to(P.dtype.element_ty))
        tl.store(G + offs, tl.full(g.shape, 0.0, G.dtype.element_ty))
    else:
        tl.store(G + offs, g.to(G.dtype.element_ty))


@triton.jit
def ttt_linear_prefill_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W0,
    B0,
    LN_W,
    LN_B,
    TOKEN_IDX,  # inputs
    Z,
    W_OUT,
    B_OUT,  # outputs
    W_START,
    B_START,  # outputs when SAVE_STATES: the state at the start of every mini-batch
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
    sw_b,
    sw_h,
    sw_r,
    sw_c,  # strides of W0 (a batch stride of 0 shares one W0 across the batch)
    sb_b,
    sb_h,
    sb_d,  # strides of b0
    D: tl.constexpr,
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    WRITE_Z: tl.constexpr,
    ACC: tl.constexpr,
):
    """TTT-Linear over a whole sequence for one (batch, head): program id = batch * H + head.

    XQ, XK, XV, Z: [B, H, T, D]; ETA: [B, H, T]; W0: [B, H, D, D], B0: [B, H, 1, D];
    LN_W, LN_B: [H, D] contiguous; TOKEN_IDX: [MB]; W_OUT: [B, H, D, D], B_OUT: [B, H, 1, D]
    contiguous. MB is the mini-batch size, BLOCK_MB the power of two >= max(MB, 16) that holds
    it (tl.dot needs every dim >= 16); rows past the mini-batch or the sequence are masked.
    The D x D state stays in registers from the first mini-batch to the last. tl.dot precisions:
    QK_PRECISION of xq xk^T (inputs only: exact in their own 16-bit type), W_PRECISION of the
    products with the state W, GRAD_PRECISION of those with the float32 gradients.
    SAVE_STATES (the training forward): W_START [B, H, NC, D, D] and B_START [B, H, NC, D],
    contiguous in ACC, receive W and b as they stand at the start of each of the NC mini-batches.
    WRITE_Z: whether this loop also computes Z; the split training forward leaves it to
    ttt_linear_output_kernel, parallel over mini-batches, so that only the state update stays in
    this sequential loop.
    ACC: the dtype of the state and arithmetic (float32; float64 for float64 inputs).
    """
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)  # position inside a mini-batch
    cols = tl.arange(0, D)

    W = tl.load(W0 + bi * sw_b + hi * sw_h + cols[:, None] * sw_r + cols[None, :] * sw_c).to(ACC)
    bias = tl.load(B0 + bi * sb_b + hi * sb_h + cols * sb_d).to(ACC)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    beta = tl.load(LN_B + hi * D + cols).to(ACC)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(ACC)
    causal = rows[None, :] <= rows[:, None]  # e[i, s] is nonzero only for s <= i

    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    z_base = bi.to(tl.int64) * sz_b + hi * sz_h
    e_base = bi.to(tl.int64) * se_b + hi * se_h
    NC = tl.cdiv(T, MB)
    for start in range(0, T, MB):
        n = tl.minimum(T - start, MB)  # tokens in this mini-batch: the last one may be short
        valid = rows < n
        t = (start + rows).to(tl.int64)
        offs = x_base + t[:, None] * sx_t + cols[None, :]
        xq = tl.load(XQ + offs, mask=valid[:, None], other=0.0)
        xk = tl.load(XK + offs, mask=valid[:, None], other=0.0)
        xv = tl.load(XV + offs, mask=valid[:, None], other=0.0).to(ACC)
        # eta = 0 past the end also zeroes those tokens' columns of e: they move no state
        eta = tl.load(ETA + e_base + t * se_t, mask=valid, other=0.0).to(ACC)
        if SAVE_STATES:
            chunk = pid.to(tl.int64) * NC + start // MB
            tl.store(W_START + chunk * D * D + cols[:, None] * D + cols[None, :], W)
            tl.store(B_START + chunk * D + cols, bias)

        # the inner model's gradient at every token, all taken at the mini-batch's start state
        z1 = dot(xk, W, W_PRECISION) + bias[None, :]
        grad = ln_l2_grad(z1, xv - xk.to(ACC), gamma, beta, D, eps)

        if WRITE_Z:
            # dual form: z_i = xq_i W_i + b_i with W_i = W - sum_{s<=i} e[i, s] xk_s^T grad_s, so
            # z = xq W + b - (e * (xq xk^T)) grad - e grad = xq W + b - (e * (xq xk^T + 1)) grad
            e = tl.where(causal, token_idx[:, None] * eta[None, :], 0.0)
            attn = dot(xq, tl.trans(xk), QK_PRECISION)
            z = dot(xq, W, W_PRECISION) + bias[None, :] - dot(e * (attn + 1.0), grad, GRAD_PRECISION)
            out = residual_ln(xq, z, gamma, beta, D, eps)
            tl.store(Z + z_base + t[:, None] * sz_t + cols[None, :], out.to(Z.dtype.element_ty), mask=valid[:, None])

        # commit with the last valid row of e: token_idx[n - 1] * eta[s] for s < n
        e_last = tl.load(TOKEN_IDX + n - 1).to(ACC) * eta
        weighted = e_last[:, None] * grad
        W -= dot(tl.trans(xk), weighted, GRAD_PRECISION)
        bias -= reduce_sum(weighted, axis=0)

    out_base = pid.to(tl.int64) * D * D
    tl.store(W_OUT + out_base + cols[:, None] * D + cols[None, :], W.to(W_OUT.dtype.element_ty))
    tl.store(B_OUT + pid * D + cols, bias.to(B_OUT.dtype.element_ty))


@triton.jit
def chunk_rows(T, c, MB: tl.constexpr, rows):
    """Mini-batch c's tokens: their times t (int64), which rows hold one (valid) and how many (n)."""
    start = c * MB
    n = tl.minimum(T - start, MB)
    return (start + rows).to(tl.int64), rows < n, n


@triton.jit
def load_rows(P, base, t, stride_t, cols, valid):
    """Rows t of a [.., T, D] tensor with contiguous last dim at P + base; rows not valid read 0."""
    return tl.load(P + base + t[:, None] * stride_t + cols[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _recompute_chunk(
    xq,
    xk,
    target,
    eta,
    token_idx,
    W,
    bias,
    gamma,
    beta,
    causal,
    D: tl.constexpr,
    eps,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
):
    """The prefill's arithmetic for one mini-batch from its start state (W, bias), as the
    backward needs it: z1 = xk W + b, grad = LN-L2-grad(z1, target), e[i, s] = token_idx[i] eta[s]
    (s <= i), attn1 = xq xk^T + 1 and z = xq W + b - (e * attn1) grad."""
    z1 = dot(xk, W, W_PRECISION) + bias[None, :]
    grad = ln_l2_grad(z1, target, gamma, beta, D, eps)
    e = tl.where(causal, token_idx[:, None] * eta[None, :], 0.0)
    attn1 = dot(xq, tl.trans(xk), QK_PRECISION) + 1.0
    z = dot(xq, W, W_PRECISION) + bias[None, :] - dot(e * attn1, grad, GRAD_PRECISION)
    return z1, grad, e, attn1, z


@triton.jit
def ttt_linear_output_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W_START,
    B_START,
    LN_W,
    LN_B,
    TOKEN_IDX,  # inputs: the forward's and the start states it saved
    Z,  # output
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
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """The training forward's output Z = XQ + LN(z), every mini-batch at once (program ids:
    mini-batch, batch * H + head), from the start states ttt_linear_prefill_kernel saved with
    SAVE_STATES. Arguments as there."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    t, valid, _ = chunk_rows(T, c, MB, rows)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    beta = tl.load(LN_B + hi * D + cols).to(ACC)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(ACC)
    causal = rows[None, :] <= rows[:, None]

    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    xq = load_rows(XQ, x_base, t, sx_t, cols, valid)
    xk = load_rows(XK, x_base, t, sx_t, cols, valid)
    target = load_rows(XV, x_base, t, sx_t, cols, valid).to(ACC) - xk.to(ACC)
    eta = tl.load(ETA + bi.to(tl.int64) * se_b + hi * se_h + t * se_t, mask=valid, other=0.0).to(ACC)
    chunk = pid.to(tl.int64) * tl.cdiv(T, MB) + c
    W = tl.load(W_START + chunk * D * D + cols[:, None] * D + cols[None, :])
    bias = tl.load(B_START + chunk * D + cols)

    _, _, _, _, z = _recompute_chunk(
        xq, xk, target, eta, token_idx, W, bias, gamma, beta, causal, D, eps, QK_PRECISION, W_PRECISION, GRAD_PRECISION
    )
    out = residual_ln(xq, z, gamma, beta, D, eps)
    z_offs = bi.to(tl.int64) * sz_b + hi * sz_h + t[:, None] * sz_t + cols[None, :]
    tl.store(Z + z_offs, out.to(Z.dtype.element_ty), mask=valid[:, None])


@triton.jit
def ttt_linear_bwd_local_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W_START,
    B_START,
    LN_W,
    LN_B,
    TOKEN_IDX,
    DZ,  # inputs: the forward's, its saved states, the gradient of Z
    DZ_LOCAL,
    DGRAD_LOCAL,
    Z_HAT1,
    G_HAT,
    STATS,  # outputs: what the adjoint recurrence reads
    T,
    BH,
    H,
    eps,
    sx_b,
    sx_h,
    sx_t,  # strides of XQ, XK, XV (last dim contiguous)
    sd_b,
    sd_h,
    sd_t,  # strides of DZ
    se_b,
    se_h,
    se_t,  # strides of eta
    D: tl.constexpr,
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """First pass of the TTT-Linear backward: everything about one mini-batch that depends only on
    its saved start state, for all mini-batches at once (program ids: mini-batch, batch * H + head).

    Writes, for ttt_linear_bwd_state_kernel, [B * H, T, D] tiles in ACC: DZ_LOCAL, the gradient of
    z (through the output LN); DGRAD_LOCAL = -M^T dz with M = e * (xq xk^T + 1), the part of the
    gradient of grad that comes from this mini-batch's own outputs; Z_HAT1 and G_HAT, the rows
    LN-L2-grad(z1) was built from; and STATS [3, B * H, T]: rstd, c1, c2 of the same (see
    _ln_l2_grad_parts). None of it depends on the adjoint of the state, so none of it needs to
    sit in the sequential recurrence.
    """
    c = tl.program_id(0)
    pid = tl.program_id(1)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    t, valid, _ = chunk_rows(T, c, MB, rows)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    beta = tl.load(LN_B + hi * D + cols).to(ACC)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(ACC)
    causal = rows[None, :] <= rows[:, None]

    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    xq = load_rows(XQ, x_base, t, sx_t, cols, valid)
    xk = load_rows(XK, x_base, t, sx_t, cols, valid)
    target = load_rows(XV, x_base, t, sx_t, cols, valid).to(ACC) - xk.to(ACC)
    eta = tl.load(ETA + bi.to(tl.int64) * se_b + hi * se_h + t * se_t, mask=valid, other=0.0).to(ACC)
    dout = load_rows(DZ, bi.to(tl.int64) * sd_b + hi * sd_h, t, sd_t, cols, valid).to(ACC)
    chunk = pid.to(tl.int64) * tl.cdiv(T, MB) + c
    W = tl.load(W_START + chunk * D * D + cols[:, None] * D + cols[None, :])
    bias = tl.load(B_START + chunk * D + cols)

    z1, grad, e, attn1, z = _recompute_chunk(
        xq, xk, target, eta, token_idx, W, bias, gamma, beta, causal, D, eps, QK_PRECISION, W_PRECISION, GRAD_PRECISION
    )
    z_hat, rstd = _normalize(z, D, eps)
    dz = _normalize_bwd(dout * gamma[None, :], z_hat, rstd, D)
    dgrad = -dot(tl.trans(e * attn1), dz, GRAD_PRECISION)
    _, z_hat1, rstd1, g_hat, c1, c2 = _ln_l2_grad_parts(z1, target, gamma, beta, D, eps)

    offs = pid.to(tl.int64) * T * D + t[:, None] * D + cols[None, :]
    tl.store(DZ_LOCAL + offs, dz, mask=valid[:, None])
    tl.store(DGRAD_LOCAL + offs, dgrad, mask=valid[:, None])
    tl.store(Z_HAT1 + offs, z_hat1, mask=valid[:, None])
    tl.store(G_HAT + offs, g_hat, mask=valid[:, None])
    row_offs = pid.to(tl.int64) * T + t
    tl.store(STATS + row_offs, rstd1, mask=valid)
    tl.store(STATS + BH * T + row_offs, c1, mask=valid)
    tl.store(STATS + 2 * BH * T + row_offs, c2, mask=valid)


@triton.jit
def ttt_linear_bwd_state_kernel(
    XQ,
    XK,
    ETA,
    LN_W,
    TOKEN_IDX,
    DZ_LOCAL,
    DGRAD_LOCAL,
    Z_HAT1,
    G_HAT,
    STATS,  # inputs: the forward's and ttt_linear_bwd_local_kernel's
    DW,
    DB,  # in: the gradient of the final state; out: that of the initial state
    DW_END,
    DB_END,  # outputs: the adjoint of the state at the end of every mini-batch
    T,
    BH,
    H,
    sx_b,
    sx_h,
    sx_t,  # strides of XQ, XK (last dim contiguous)
    se_b,
    se_h,
    se_t,  # strides of eta
    D: tl.constexpr,
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """The sequential part of the TTT-Linear backward: the adjoint (dW, db) of the state carried
    through the mini-batches in reverse, one program per (batch, head).

    DW [B, H, D, D], DB [B, H, D] (ACC, contiguous) come in holding the gradient of the final state
    and leave holding that of W0, b0; DW_END [B * H, NC, D, D], DB_END [B * H, NC, D] receive the
    adjoint of each mini-batch's end state, from which ttt_linear_bwd_inputs_kernel derives the
    gradients of the inputs in parallel. Per mini-batch, with (dW', db') the adjoint of its end
    state W' = W - xk^T (e_last grad), b' = b - sum_s e_last[s] grad[s]:
        u = xk dW' + db',  dgrad = dgrad_local - e_last u,  dz1 = backward of LN-L2-grad(dgrad),
        dW = dW' + xq^T dz + xk^T dz1,  db = db' + sum_s (dz + dz1)[s],
    dz and dgrad_local read from ttt_linear_bwd_local_kernel's tiles. Only u, dz1 and the dW update
    depend on the previous step: two products with the D x D adjoint and one row-wise backward.
    """
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    state_offs = cols[:, None] * D + cols[None, :]
    dW = tl.load(DW + pid.to(tl.int64) * D * D + state_offs).to(ACC)
    db = tl.load(DB + pid * D + cols).to(ACC)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    e_base = bi.to(tl.int64) * se_b + hi * se_h
    l_base = pid.to(tl.int64) * T * D
    NC = tl.cdiv(T, MB)
    for step in range(0, NC):
        c = NC - 1 - step
        chunk = pid.to(tl.int64) * NC + c
        tl.store(DW_END + chunk * D * D + state_offs, dW)
        tl.store(DB_END + chunk * D + cols, db)
        t, valid, n = chunk_rows(T, c, MB, rows)
        xq = load_rows(XQ, x_base, t, sx_t, cols, valid)
        xk = load_rows(XK, x_base, t, sx_t, cols, valid)
        dz = load_rows(DZ_LOCAL, l_base, t, D, cols, valid)
        dgrad_local = load_rows(DGRAD_LOCAL, l_base, t, D, cols, valid)
        z_hat = load_rows(Z_HAT1, l_base, t, D, cols, valid)
        g_hat = load_rows(G_HAT, l_base, t, D, cols, valid)
        row_offs = pid.to(tl.int64) * T + t
        rstd = tl.load(STATS + row_offs, mask=valid, other=0.0)
        c1 = tl.load(STATS + BH * T + row_offs, mask=valid, other=0.0)
        c2 = tl.load(STATS + 2 * BH * T + row_offs, mask=valid, other=0.0)
        e_last = tl.load(TOKEN_IDX + n - 1).to(ACC) * tl.load(ETA + e_base + t * se_t, mask=valid, other=0.0).to(ACC)
        grad = (g_hat - c1[:, None] - z_hat * c2[:, None]) * rstd[:, None]

        u = dot(xk, dW, GRAD_PRECISION) + db[None, :]
        dz1, _ = _ln_l2_grad_bwd_z(dgrad_local - e_last[:, None] * u, grad, z_hat, rstd, g_hat, c2, gamma, D)
        dW += dot(tl.trans(xq), dz, GRAD_PRECISION) + dot(tl.trans(xk), dz1, GRAD_PRECISION)
        db += reduce_sum(dz + dz1, axis=0)

    tl.store(DW + pid.to(tl.int64) * D * D + state_offs, dW)
    tl.store(DB + pid * D + cols, db)


@triton.jit
def ttt_linear_bwd_inputs_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W_START,
    B_START,
    LN_W,
    LN_B,
    TOKEN_IDX,
    DZ,
    DW_END,
    DB_END,  # inputs: the forward's, its saved states, the gradient of Z, the adjoint at each end
    DW,
    DB,  # SEQUENTIAL only: in, the gradient of the final state; out, that of the initial state
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
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
    SEQUENTIAL: tl.constexpr,
    ACC: tl.constexpr,
):
    """The gradients of the inputs of one mini-batch, from its start state (W_START, B_START) and
    the adjoint (dW', db') of its end state.

    Two schedules. Split (SEQUENTIAL false): the last pass of the three-kernel backward, every
    mini-batch at once (program ids: mini-batch, batch * H + head), reading the adjoint from
    DW_END, DB_END (ttt_linear_bwd_state_kernel's). Fused (SEQUENTIAL true): the whole backward
    in one program per (batch, head) (program ids: 0, batch * H + head), mini-batches in reverse,
    carrying the adjoint in registers from DW, DB and updating it as ttt_linear_bwd_state_kernel
    does; DW_END, DB_END are not read.

    DXQ, DXK, DXV: [B, H, T, D]; DETA [B, H, T] contiguous; DLN_W, DLN_B [B * H * NC, D] and
    DTOKEN_IDX [B * H * NC, BLOCK_MB] receive each mini-batch's share, summed by the caller.
    From the recomputed forward (_recompute_chunk), given dout and (dW', db'):
    - dz from LN's backward; dxq = dout + dz W^T + (dM * e) xk with dM = -dz grad^T;
    - grad gets -M^T dz from z and e_last du from the commit, du = -(xk dW' + db');
    - dz1 from the backward of the closed-form gradient; xk collects all three paths;
    - e[i, s] = token_idx[i] eta[s] gives d eta and d token_idx from de = dM * (xq xk^T + 1)
      and d e_last = sum over D of du * grad;
    - fused: the adjoint of the start state, dW = dW' + xq^T dz + xk^T dz1, db likewise.
    dM and du, which reach eta and token_idx through sums over many terms, are taken at
    W_PRECISION (tf32 for 16-bit inputs) rather than GRAD_PRECISION. Padded rows (past T) have
    eta = 0 and dout = 0, so every term they could add is zero.
    """
    pid = tl.program_id(1)
    bi = pid // H
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    gamma = tl.load(LN_W + hi * D + cols).to(ACC)
    beta = tl.load(LN_B + hi * D + cols).to(ACC)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(ACC)
    causal = rows[None, :] <= rows[:, None]
    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    g_base = bi.to(tl.int64) * sg_b + hi * sg_h
    cells = cols[:, None] * D + cols[None, :]
    NC = tl.cdiv(T, MB)
    if SEQUENTIAL:
        dW = tl.load(DW + pid.to(tl.int64) * D * D + cells).to(ACC)
        db = tl.load(DB + pid * D + cols).to(ACC)
        steps = NC
    else:
        dW = tl.zeros([D, D], dtype=ACC)
        db = tl.zeros([D], dtype=ACC)
        steps = 1
    for step in range(0, steps):
        if SEQUENTIAL:
            c = NC - 1 - step
        else:
            c = tl.program_id(0)
        t, valid, n = chunk_rows(T, c, MB, rows)
        xq = load_rows(XQ, x_base, t, sx_t, cols, valid)
        xk = load_rows(XK, x_base, t, sx_t, cols, valid)
        target = load_rows(XV, x_base, t, sx_t, cols, valid).to(ACC) - xk.to(ACC)
        eta = tl.load(ETA + bi.to(tl.int64) * se_b + hi * se_h + t * se_t, mask=valid, other=0.0).to(ACC)
        dout = load_rows(DZ, bi.to(tl.int64) * sd_b + hi * sd_h, t, sd_t, cols, valid).to(ACC)
        chunk = pid.to(tl.int64) * NC + c
        W = tl.load(W_START + chunk * D * D + cells)
        bias = tl.load(B_START + chunk * D + cols)
        if not SEQUENTIAL:
            dW = tl.load(DW_END + chunk * D * D + cells)
            db = tl.load(DB_END + chunk * D + cols)

        z1, grad, e, attn1, z = _recompute_chunk(
            xq, xk, target, eta, token_idx, W, bias, gamma, beta, causal, D, eps,
            QK_PRECISION, W_PRECISION, GRAD_PRECISION,
        )  # fmt: skip
        z_hat, rstd = _normalize(z, D, eps)
        # out = xq + LN(z)
        dgamma = reduce_sum(dout * z_hat, axis=0)
        dbeta = reduce_sum(dout, axis=0)
        dz = _normalize_bwd(dout * gamma[None, :], z_hat, rstd, D)
        # z = xq W + b - M grad, M = e * (xq xk^T + 1)
        dM = -dot(dz, tl.trans(grad), W_PRECISION)
        de = tl.where(causal, dM * attn1, 0.0)
        dxq = dout + dot(dz, tl.trans(W), W_PRECISION) + dot(dM * e, xk, GRAD_PRECISION)
        dxk = dot(tl.trans(dM * e), xq, GRAD_PRECISION)
        # the commit: W' = W - xk^T u, b' = b - sum_s u_s with u = e_last grad
        tau_last = tl.load(TOKEN_IDX + n - 1).to(ACC)
        e_last = tau_last * eta
        du = -(dot(xk, dW, W_PRECISION) + db[None, :])
        dxk -= dot(e_last[:, None] * grad, tl.trans(dW), GRAD_PRECISION)
        dgrad = e_last[:, None] * du - dot(tl.trans(e * attn1), dz, GRAD_PRECISION)
        de_last = reduce_sum(du * grad, axis=1)
        # grad = LN-L2-grad(z1, xv - xk), z1 = xk W + b
        dz1, dtarget, dgamma_g, dbeta_g = _ln_l2_grad_bwd(dgrad, grad, z1, target, gamma, beta, D, eps)
        dxk += dot(dz1, tl.trans(W), W_PRECISION) - dtarget
        # e[i, s] = token_idx[i] eta[s] (s <= i), e_last[s] = token_idx[n - 1] eta[s]
        deta = reduce_sum(de * token_idx[:, None], axis=0) + tau_last * de_last
        dtoken_idx = reduce_sum(de * eta[None, :], axis=1) + tl.where(
            rows == n - 1, reduce_sum(de_last * eta, axis=0), 0.0
        )
        if SEQUENTIAL:  # the adjoint of this mini-batch's start state, for the one before it
            dW += dot(tl.trans(xq), dz, GRAD_PRECISION) + dot(tl.trans(xk), dz1, GRAD_PRECISION)
            db += reduce_sum(dz + dz1, axis=0)

        goffs = g_base + t[:, None] * sg_t + cols[None, :]
        tl.store(DXQ + goffs, dxq.to(DXQ.dtype.element_ty), mask=valid[:, None])
        tl.store(DXK + goffs, dxk.to(DXK.dtype.element_ty), mask=valid[:, None])
        tl.store(DXV + goffs, dtarget.to(DXV.dtype.element_ty), mask=valid[:, None])
        tl.store(DETA + pid.to(tl.int64) * T + t, deta.to(DETA.dtype.element_ty), mask=valid)
        tl.store(DLN_W + chunk * D + cols, dgamma + dgamma_g)
        tl.store(DLN_B + chunk * D + cols, dbeta + dbeta_g)
        tl.store(DTOKEN_IDX + chunk * BLOCK_MB + rows, dtoken_idx)
    if SEQUENTIAL:
        tl.store(DW + pid.to(tl.int64) * D * D + cells, dW)
        tl.store(DB + pid * D + cols, db)


@triton.jit(do_not_specialize=["pos_value"])  # one compiled program for every position
def ttt_linear_decode_kernel(
    XQ,
    XK,
    XV,
    ETA,
    W,
    Bv,
    GW,
    GB,
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
    MB: tl.constexpr,
    ROWS: tl.constexpr,
    POS_FROM_PTR: tl.constexpr,
):
    """One token of TTT-Linear, primal form, for one (batch, head); updates the state in place.

    XQ, XK, XV: [B, H, 1, D]; ETA: [B, H]; W, GW: [B, H, D, D] and Bv, GB: [B, H, 1, D]
    contiguous (the state: weights at the mini-batch start and eta-weighted gradient sums);
    Z: [B, H, 1, D] contiguous. The position inside the mini-batch is read from POS when
    POS_FROM_PTR (a device tensor: no host sync, so a CUDA graph can replay it; POS[b] for row b
    with pos_stride 1, POS[0] for every row with 0) else pos_value.
    W is walked ROWS rows at a time so a D = 128 state need not sit in registers at once.
    """
    pid = tl.program_id(0)
    bi = pid // H
    hi = pid % H
    cols = tl.arange(0, D)
    rows = tl.arange(0, ROWS)
    x_base = bi.to(tl.int64) * sx_b + hi * sx_h
    s_base = pid.to(tl.int64) * D * D
    pos = _position(POS, bi, pos_stride, pos_value, POS_FROM_PTR)
    scale = tl.load(TOKEN_IDX + pos).to(tl.float32)
    eta = tl.load(ETA + bi * se_b + hi * se_h).to(tl.float32)
    gamma = tl.load(LN_W + hi * D + cols).to(tl.float32)
    beta = tl.load(LN_B + hi * D + cols).to(tl.float32)
    xq = tl.load(XQ + x_base + cols).to(tl.float32)
    xk = tl.load(XK + x_base + cols).to(tl.float32)
    xv = tl.load(XV + x_base + cols).to(tl.float32)
    bias = tl.load(Bv + pid * D + cols).to(tl.float32)
    grad_b = tl.load(GB + pid * D + cols).to(tl.float32)

    # pass 1: the gradient at the mini-batch's start state W, b
    z1 = bias
    for r0 in tl.static_range(0, D, ROWS):
        w = tl.load(W + s_base + (r0 + rows)[:, None] * D + cols[None, :]).to(tl.float32)
        xk_r = tl.load(XK + x_base + r0 + rows).to(tl.float32)
        z1 += reduce_sum(xk_r[:, None] * w, axis=0)
    g = reduce_sum(ln_l2_grad(z1[None, :], (xv - xk)[None, :], gamma, beta, D, eps), axis=0)

    # pass 2: add this token's gradient, predict with W - scale * grad_W, commit at the last position
    commit = pos == MB - 1
    grad_b += eta * g
    b_eff = bias - scale * grad_b
    z = b_eff
    for r0 in tl.static_range(0, D, ROWS):
        offs = s_base + (r0 + rows)[:, None] * D + cols[None, :]
        w = tl.load(W + offs).to(tl.float32)
        gw = tl.load(GW + offs).to(tl.float32)
        xk_r = tl.load(XK + x_base + r0 + rows).to(tl.float32)
        xq_r = tl.load(XQ + x_base + r0 + rows).to(tl.float32)
        gw += eta * xk_r[:, None] * g[None, :]
        w_eff = w - scale * gw
        z += reduce_sum(xq_r[:, None] * w_eff, axis=0)
        _store_state(W, GW, offs, w_eff, gw, commit)  # a commit starts the next mini-batch from w_eff
    _store_state(Bv, GB, pid * D + cols, b_eff, grad_b, commit)

    out = reduce_sum(residual_ln(xq[None, :], z[None, :], gamma, beta, D, eps), axis=0)
    tl.store(Z + pid * D + cols, out.to(Z.dtype.element_ty))

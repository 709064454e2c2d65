"""Where the TTT-MLP prefill keeps its state: streamed through the L2 cache in chunks of the hidden
width (the library's kernel), or held on chip for the whole sequence (`onchip_prefill_kernel`,
below: W1, b1, W2, b2 as values the mini-batch loop carries, so Triton keeps them in registers
and stages the products' operands through shared memory; Triton has no way to pin a tensor in
shared memory across loop iterations). One (batch, head) per program as in the library; the time
per mini-batch step at batch 1 is latency, as for TTT-Linear (`step`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttt_helpers.kernels.triton_ttt_linear import chunk_rows, dot, ln_l2_grad, load_rows, reduce_sum, residual_ln
from ttt_helpers.kernels.triton_ttt_mlp import gelu, gelu_grad
from ttt_helpers.testing import rel_err

from .inputs import MLP_PARAMS, Scale, mlp_inputs, to64
from .launch import with_launch
from .op import TOLERANCES
from .timing import Runner


@triton.jit
def onchip_prefill_kernel(
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
    D: tl.constexpr,
    F: tl.constexpr,
    MB: tl.constexpr,
    BLOCK_MB: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    W_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr,
):
    """ttt_mlp_prefill_kernel's forward with the whole state loaded once and carried by the loop.

    XQ, XK, XV, Z: [B, H, T, D], ETA: [B, H, T], all contiguous; W1 [B, H, D, F], B1 [B, H, 1, F],
    W2 [B, H, F, D], B2 [B, H, 1, D] in float32: the initial state, overwritten with the final one.
    Per mini-batch the same products as the library's kernel, each over all of F at once.
    """
    pid = tl.program_id(0)
    hi = pid % H
    rows = tl.arange(0, BLOCK_MB)
    cols = tl.arange(0, D)
    fcols = tl.arange(0, F)
    w1_ptrs = W1 + pid.to(tl.int64) * D * F + cols[:, None] * F + fcols[None, :]
    w2_ptrs = W2 + pid.to(tl.int64) * F * D + fcols[:, None] * D + cols[None, :]
    w1 = tl.load(w1_ptrs)
    b1 = tl.load(B1 + pid * F + fcols)
    w2 = tl.load(w2_ptrs)
    b2 = tl.load(B2 + pid * D + cols)
    gamma = tl.load(LN_W + hi * D + cols).to(tl.float32)
    beta = tl.load(LN_B + hi * D + cols).to(tl.float32)
    token_idx = tl.load(TOKEN_IDX + rows, mask=rows < MB, other=0.0).to(tl.float32)
    causal = rows[None, :] <= rows[:, None]
    x_base = pid.to(tl.int64) * T * D
    for c in range(0, tl.cdiv(T, MB)):
        t, valid, n = chunk_rows(T, c, MB, rows)
        xq = load_rows(XQ, x_base, t, D, cols, valid)
        xk = load_rows(XK, x_base, t, D, cols, valid)
        xv = load_rows(XV, x_base, t, D, cols, valid).to(tl.float32)
        eta = tl.load(ETA + pid.to(tl.int64) * T + t, mask=valid, other=0.0).to(tl.float32)
        e = tl.where(causal, token_idx[:, None] * eta[None, :], 0.0)
        e_last = tl.load(TOKEN_IDX + n - 1).to(tl.float32) * eta

        z1k = dot(xk, w1, W_PRECISION) + b1[None, :]
        x2k = gelu(z1k)
        grad_z2 = ln_l2_grad(dot(x2k, w2, W_PRECISION) + b2[None, :], xv - xk.to(tl.float32), gamma, beta, D, eps)
        grad_z1 = dot(grad_z2, tl.trans(w2), W_PRECISION) * gelu_grad(z1k)
        e_qk = e * (dot(xq, tl.trans(xk), QK_PRECISION) + 1.0)
        h = gelu(dot(xq, w1, W_PRECISION) + b1[None, :] - dot(e_qk, grad_z1, GRAD_PRECISION))
        e_hx = e * (dot(h, tl.trans(x2k), GRAD_PRECISION) + 1.0)
        z2q = dot(h, w2, W_PRECISION) + b2[None, :] - dot(e_hx, grad_z2, GRAD_PRECISION)
        weighted1 = e_last[:, None] * grad_z1
        weighted2 = e_last[:, None] * grad_z2
        w1 -= dot(tl.trans(xk), weighted1, GRAD_PRECISION)
        b1 -= reduce_sum(weighted1, axis=0)
        w2 -= dot(tl.trans(x2k), weighted2, GRAD_PRECISION)
        b2 -= reduce_sum(weighted2, axis=0)
        out = residual_ln(xq, z2q, gamma, beta, D, eps)
        tl.store(Z + x_base + t[:, None] * D + cols[None, :], out.to(Z.dtype.element_ty), mask=valid[:, None])
    tl.store(w1_ptrs, w1)
    tl.store(B1 + pid * F + fcols, b1)
    tl.store(w2_ptrs, w2)
    tl.store(B2 + pid * D + cols, b2)


def onchip_prefill(args: dict, num_warps: int, mini_batch_size: int = 16) -> tuple[tuple[torch.Tensor, ...], object]:
    """(Z [B, H, T, D] and the final W1, b1, W2, b2 in float32, the compiled kernel) for `args`
    (mlp_inputs) through onchip_prefill_kernel, with the library's dot precisions."""
    from ttt_helpers import ops
    from ttt_helpers.kernels.common import mini_batch_block, precisions

    XQ = args["XQ"]
    B, H, T, D = XQ.shape
    if not all(args[k].is_contiguous() for k in ("XQ", "XK", "XV", "eta")):
        raise ValueError("onchip_prefill: XQ, XK, XV and eta must be contiguous")
    state = [args[k].float().contiguous().clone() for k in MLP_PARAMS]
    Z = torch.empty_like(XQ)
    qk_precision, w_precision, grad_precision = precisions(XQ.dtype)
    compiled = onchip_prefill_kernel[(B * H,)](
        XQ,
        args["XK"],
        args["XV"],
        args["eta"],
        *state,
        args["ln_weight"].contiguous(),
        args["ln_bias"].contiguous(),
        ops.default_token_idx(mini_batch_size, device=XQ.device),
        Z,
        T,
        H,
        1e-6,
        D=D,
        F=args["W1"].shape[-1],
        MB=mini_batch_size,
        BLOCK_MB=mini_batch_block(mini_batch_size),
        QK_PRECISION=qk_precision,
        W_PRECISION=w_precision,
        GRAD_PRECISION=grad_precision,
        num_warps=num_warps,
    )
    return (Z, *state), compiled


def _resources(compiled) -> dict:
    """Registers per thread, spilled registers and shared memory of a compiled Triton kernel."""
    meta = getattr(compiled, "metadata", None)
    return {
        "registers": getattr(compiled, "n_regs", None),
        "spills": getattr(compiled, "n_spills", None),
        "shared_bytes": getattr(meta, "shared", None),
    }


def mlp_state(run: Runner, scale: Scale) -> dict:
    """The library's streaming kernel (its chunk FB and warps, and wider/more) against the on-chip
    kernel (several warp counts): error against float64, microseconds per mini-batch step at
    batch 1, milliseconds at batch 16, and each compiled kernel's registers, spills and shared memory."""
    from ttt_helpers import ops
    from ttt_helpers.kernels import ttt_mlp as module
    from ttt_helpers.kernels import ttt_mlp_prefill

    H, D, MB = scale.H, scale.D, scale.MB
    result = {
        "note": "streaming: ttt_helpers' TTT-MLP prefill kernel, its state in global memory (L2) streamed FB "
        "columns of F at a time (library default FB 32, 4 warps at D 64); on_chip: the same forward with "
        "the whole state carried in registers by the mini-batch loop (benchmarks/kernel_bench/mlp_state.py). "
        "us_per_step: prefill time at batch 1 (H heads in parallel, one chain each) over T / b steps; "
        "rel_err_Z_<dtype>: against the float64 reference ops.ttt_mlp, B 1, H 4, T 333, fresh inputs "
        "(tolerances as the correctness sections); registers, spills, shared_bytes: the compiled on-chip kernel",
        "rows": [],
    }
    checks = {dtype: mlp_inputs(1, 4, 333, D, dtype, device=run.device) for dtype, _ in TOLERANCES}
    z_refs = {dtype: ops.ttt_mlp(**to64(args))[0] for dtype, args in checks.items()}
    inputs = {T: mlp_inputs(1, H, T, D, torch.bfloat16, device=run.device) for T in scale.step_lengths[:2]}
    batch = mlp_inputs(16 if run.cuda else 2, H, 2048 if run.cuda else 32, D, torch.bfloat16, device=run.device)
    variants = [("streaming", fb, nw) for fb, nw in ((32, 4), (32, 8), (64, 8))] if run.cuda else [("streaming", 16, 4)]
    variants += [("on_chip", None, nw) for nw in ((4, 8, 16) if run.cuda else (4,))]
    for kind, fb, nw in variants:
        row = {"state": kind, "FB": fb, "num_warps": nw}
        if kind == "streaming":
            undo = with_launch(module, "ttt_mlp_prefill_kernel", num_warps=nw, FB=fb)
            prefill = lambda a: ttt_mlp_prefill(**a)
        else:
            undo = lambda: None
            prefill = lambda a, nw=nw: onchip_prefill(a, nw)[0]
        try:
            for dtype, tolerance in TOLERANCES:
                key = f"rel_err_Z_{str(dtype).removeprefix('torch.')}"
                err = run.attempt(row, key, lambda d=dtype: rel_err(prefill(checks[d])[0], z_refs[d]))
                row["ok"] = row.get("ok", True) and err is not None and err < tolerance
            for T, args in inputs.items():
                ms = run.attempt(row, f"ms_B1_T{T}", lambda a=args: run.fast_ms(lambda: prefill(a)))
                if ms is not None:
                    row[f"us_per_step_T{T}"] = ms * 1e3 / (T // MB)
            B, T = batch["XQ"].shape[0], batch["XQ"].shape[2]
            run.attempt(row, f"ms_B{B}_T{T}", lambda: run.fast_ms(lambda: prefill(batch)))
            if kind == "on_chip":
                row |= _resources(onchip_prefill(checks[torch.bfloat16], nw)[1])
        finally:
            undo()
        result["rows"].append(row)
        print(f"  mlp state {row}", flush=True)
    return result

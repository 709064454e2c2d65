"""TTT-MLP as Triton kernels: the prefill (mini-batch dual form, one program per head), its
backward for training, and the decode step (primal form), checked against `ops.ttt_mlp` and
`ops.ttt_mlp_step`.

The state per head, W1 [D, F], b1 [F], W2 [F, D], b2 [D] (F = 4D in the layers), is 8 D^2
floats with the decode step's gradient sums: too large for registers (triton_ttt_mlp.py), so the
kernels keep it in float32 in global memory and stream it through in chunks of the hidden width.
Supported: head dims 16, 32, 64, 128; F a multiple of 16; mini_batch_size 1 to 64; inputs in
float16, bfloat16 or float32 (float64 too in `ttt_mlp_train`); any T. Outputs keep the dtype of
what they replace, as in `ttt_linear`. `ttt_mlp_prefill` runs forward only, `ttt_mlp_train` under
autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.kinds import KINDS, State
from ..ops.mini_batch import default_token_idx
from .common import (
    INPUT_DTYPES,
    TRAIN_DTYPES,
    accumulator,
    check_decode,
    decode_buffers,
    launch_settings,
    norm_args,
    num_warps,
    prepare_prefill,
    strides,
)

MLP = KINDS["mlp"]


def programs():
    """The Triton module of the TTT-MLP kernels, imported on first use."""
    from . import triton_ttt_mlp

    return triton_ttt_mlp


def _check_width(F: int) -> None:
    """F must be a multiple of 16, the narrowest chunk the kernels stream."""
    if F % 16:
        raise ValueError(f"the hidden width F = W1.shape[-1] must be a multiple of 16, got {F}")


def _chunk(F: int) -> int:
    """Columns of F per chunk: 32 (16 when F is not a multiple of 32)."""
    return 32 if F % 32 == 0 else 16


@torch.compiler.disable  # host-side checks and launches: a compiled model runs them eagerly
def ttt_mlp_prefill(
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
    """`ops.ttt_mlp` as one Triton kernel, one program per (batch, head) over every mini-batch.

    XQ, XK, XV: [B, H, T, D] (any strides with a contiguous last dim); eta: [B, H, T];
    W1: [B, H, D, F], b1: [B, H, 1, F], W2: [B, H, F, D], b2: [B, H, 1, D] (may be expanded
    over B; never written to); ln_weight, ln_bias: [H, D]; token_idx: [mini_batch_size].
    Returns Z: [B, H, T, D] in XQ's dtype and layout, and the final W1, b1, W2, b2 in the dtypes
    of the initial ones.
    """
    params = (W1, b1, W2, b2)
    XQ, XK, XV, token_idx, Z = _prepare(XQ, XK, XV, eta, params, ln_weight, ln_bias, mini_batch_size, token_idx)
    state = _launch_prefill(XQ, XK, XV, eta, params, ln_weight, ln_bias, mini_batch_size, token_idx, eps, Z)
    return Z, *(s.to(p.dtype) for s, p in zip(state, params))


def _prepare(XQ, XK, XV, eta, params, ln_weight, ln_bias, mini_batch_size, token_idx, dtypes=INPUT_DTYPES):
    """`prepare_prefill` with TTT-MLP's state (dtypes: TRAIN_DTYPES for the training path)."""
    prepared = prepare_prefill(XQ, XK, XV, eta, MLP, params, ln_weight, ln_bias, mini_batch_size, token_idx, dtypes)
    _check_width(params[0].shape[-1])
    return prepared


def _launch_prefill(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    params: State,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor,
    eps: float,
    Z: Tensor,
    *,
    save_states: bool = False,
) -> State:
    """Run the prefill kernel on checked arguments, writing Z. Returns the final W1, b1, W2, b2 in
    the kernel's dtype (float32; float64 for float64 inputs) or, when save_states, every state:
    [B, H, NC + 1, ...] each, slot c the start of mini-batch c and slot NC the final state."""
    B, H, T, D = XQ.shape
    F = params[0].shape[-1]
    acc = accumulator(XQ.dtype)[0]
    slots = (-(-T // mini_batch_size) + 1,) if save_states else ()
    # the kernel updates the state in place: copies, never the caller's tensors
    state = []
    for shape, p in zip(MLP.state_shapes(B, H, D, F), params):
        buffer = torch.empty((B, H, *slots, *shape[2:]), dtype=acc, device=XQ.device)
        (buffer[:, :, 0] if save_states else buffer).copy_(p)
        state.append(buffer)
    programs().ttt_mlp_prefill_kernel[(B * H,)](
        XQ=XQ, XK=XK, XV=XV, ETA=eta, **dict(zip(("W1", "B1", "W2", "B2"), state)),
        **norm_args(ln_weight, ln_bias, token_idx), Z=Z, T=T, H=H, eps=eps,
        **strides("sx", XQ), **strides("sz", Z), **strides("se", eta),
        F=F, FB=_chunk(F), SAVE_STATES=save_states, **launch_settings(XQ.dtype, D, mini_batch_size),
    )  # fmt: skip
    return tuple(state)


class TTTMLPFunction(torch.autograd.Function):
    """`ops.ttt_mlp` under autograd: forward and backward are Triton kernels.

    The forward saves the state at the start of every mini-batch (it writes mini-batch c's update
    into slot c + 1 instead of over slot c, so saving costs no extra pass): W1, b1, W2, b2 as
    [B, H, NC + 1, ...] in float32 (float64 for float64 inputs).

    The backward kernel walks the mini-batches in reverse, one program per (batch, head), with the
    adjoint of the state in global memory (float32, streamed in chunks like the state).
    """

    @staticmethod
    def forward(ctx, XQ, XK, XV, eta, W1, b1, W2, b2, ln_weight, ln_bias, token_idx, mini_batch_size, eps):
        params = (W1, b1, W2, b2)
        XQ, XK, XV, token_idx, Z = _prepare(
            XQ, XK, XV, eta, params, ln_weight, ln_bias, mini_batch_size, token_idx, TRAIN_DTYPES
        )
        states = _launch_prefill(
            XQ, XK, XV, eta, params, ln_weight, ln_bias, mini_batch_size, token_idx, eps, Z, save_states=True
        )
        ctx.save_for_backward(XQ, XK, XV, eta, ln_weight, ln_bias, token_idx, *states)
        ctx.mini_batch_size, ctx.eps, ctx.state_dtypes = mini_batch_size, eps, tuple(p.dtype for p in params)
        return Z, *(s[:, :, -1].to(p.dtype) for s, p in zip(states, params))

    @staticmethod
    def backward(ctx, dZ, *d_final):
        XQ, XK, XV, eta, ln_weight, ln_bias, token_idx, *states = ctx.saved_tensors
        B, H, T, D = XQ.shape
        F = states[0].shape[-1]
        acc = accumulator(XQ.dtype)[0]
        dZ = dZ if dZ.stride(-1) == 1 else dZ.contiguous()
        settings = launch_settings(XQ.dtype, D, ctx.mini_batch_size)
        # the adjoint of the state, updated in place into the gradient of the initial state
        adjoint = [
            torch.empty(shape, dtype=acc, device=XQ.device).copy_(d)
            for shape, d in zip(MLP.state_shapes(B, H, D, F), d_final)
        ]
        dXQ, dXK, dXV = (torch.empty((B, H, T, D), dtype=x.dtype, device=x.device) for x in (XQ, XK, XV))
        deta = torch.empty((B, H, T), dtype=eta.dtype, device=eta.device)
        dln_w, dln_b = (torch.empty((B, H, D), dtype=acc, device=XQ.device) for _ in range(2))
        dtoken_idx = torch.empty((B, H, settings["BLOCK_MB"]), dtype=acc, device=XQ.device)
        programs().ttt_mlp_backward_kernel[(B * H,)](
            XQ=XQ, XK=XK, XV=XV, ETA=eta, **dict(zip(("W1", "B1", "W2", "B2"), states)),
            **norm_args(ln_weight, ln_bias, token_idx), DZ=dZ, **dict(zip(("DW1", "DB1", "DW2", "DB2"), adjoint)),
            DXQ=dXQ, DXK=dXK, DXV=dXV, DETA=deta, DLN_W=dln_w, DLN_B=dln_b, DTOKEN_IDX=dtoken_idx,
            T=T, H=H, eps=ctx.eps, **strides("sx", XQ), **strides("sd", dZ), **strides("sg", dXQ),
            **strides("se", eta), F=F, FB=_chunk(F), **settings,
        )  # fmt: skip
        dparams = (a.to(dtype) for a, dtype in zip(adjoint, ctx.state_dtypes))
        dln = (dln_w.sum(0).to(ln_weight.dtype), dln_b.sum(0).to(ln_bias.dtype))
        dtoken_idx = dtoken_idx.sum((0, 1))[: ctx.mini_batch_size].to(token_idx.dtype)
        return dXQ, dXK, dXV, deta, *dparams, *dln, dtoken_idx, None, None


@torch.compiler.disable  # host-side checks and launches: a compiled model runs them eagerly
def ttt_mlp_train(
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
    """`ops.ttt_mlp` with a Triton forward and backward (`TTTMLPFunction`): what training runs.

    Arguments and results as in `ttt_mlp_prefill`; dtypes float16, bfloat16, float32 or float64.
    Gradients reach every tensor argument, and a gradient on the returned final state flows back.
    """
    if token_idx is None:
        token_idx = default_token_idx(mini_batch_size, device=XQ.device if isinstance(XQ, Tensor) else None)
    return TTTMLPFunction.apply(XQ, XK, XV, eta, W1, b1, W2, b2, ln_weight, ln_bias, token_idx, mini_batch_size, eps)


@torch.compiler.disable  # host-side checks and launches: a compiled model runs them eagerly
def ttt_mlp_decode(
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
    *,
    out: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """One decoded token of TTT-MLP for a batch of sequences, updating `state` in place.

    Same result as `ops.decode_step`: `ops.ttt_mlp_step`, followed by `ops.commit_state` at the
    mini-batch's last position. xq, xk, xv: [B, H, 1, D]; eta: [B, H]; state = (W1, b1, W2, b2,
    grad_W1, grad_b1, grad_W2, grad_b2): [B, H, D, F], [B, H, 1, F], [B, H, F, D], [B, H, 1, D]
    and the same for the gradient sums, contiguous; position, token_idx and check as in
    `ttt_linear_decode`. Returns z: [B, H, 1, D] (written into `out` when given).
    """
    if check:
        check_decode(xq, xk, xv, eta, MLP, state, position, ln_weight, ln_bias, token_idx, out)
        _check_width(state[0].shape[-1])
    xq, xk, xv, out, pos = decode_buffers(xq, xk, xv, position, token_idx, out)
    B, H, _, D = xq.shape
    F = state[0].shape[-1]
    programs().ttt_mlp_decode_kernel[(B * H,)](
        XQ=xq, XK=xk, XV=xv, ETA=eta, **dict(zip(("W1", "B1", "W2", "B2", "GW1", "GB1", "GW2", "GB2"), state)),
        **pos, **norm_args(ln_weight, ln_bias, token_idx), Z=out, H=H, eps=eps,
        **strides("sx", xq, "bh"), **strides("se", eta, "bh"),
        D=D, F=F, FB=_chunk(F), MB=token_idx.shape[0], num_warps=num_warps(D),
    )  # fmt: skip
    return out

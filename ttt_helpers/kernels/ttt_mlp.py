"""TTT-MLP as Triton kernels: the prefill (mini-batch dual form, one program per head) and the
decode step (primal form), checked against `ops.ttt_mlp` and `ops.ttt_mlp_step`.

The state per head, W1 [D, F], b1 [F], W2 [F, D], b2 [D] (F = 4D in the layers), is 8 D^2
floats with the decode step's gradient sums: too large for registers (triton_ttt_mlp.py), so the
kernels keep it in float32 in global memory and stream it through in chunks of the hidden width.
Supported: head dims 16, 32, 64, 128; F a multiple of 16; mini_batch_size 1 to 64; inputs in
float16, bfloat16 or float32; any T. Outputs keep the dtype of what they replace, as in
`ttt_linear`. Forward only (no autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import mini_batch_block, num_warps, precisions, prepare_decode, prepare_prefill

State = tuple[Tensor, ...]
STATE_NAMES = ("W1", "b1", "W2", "b2")


def _programs():
    """The Triton module, imported on first use."""
    from . import triton_ttt_mlp

    return triton_ttt_mlp


def _hidden_width(W1: object, D: int) -> int:
    """F from W1 [..., D, F] (4D when W1 is malformed: its shape check then names it); F must be a
    multiple of 16, the narrowest chunk the kernels stream."""
    F = W1.shape[-1] if isinstance(W1, Tensor) and W1.dim() == 4 else 4 * D
    if F % 16:
        raise ValueError(f"the hidden width F = W1.shape[-1] must be a multiple of 16, got {F}")
    return F


def _state_shapes(B: int, H: int, D: int, F: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of W1, b1, W2, b2."""
    return (B, H, D, F), (B, H, 1, F), (B, H, F, D), (B, H, 1, D)


def _chunk(F: int) -> int:
    """Columns of F per chunk: 32 (16 when F is not a multiple of 32)."""
    return 32 if F % 32 == 0 else 16


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
    params = dict(zip(STATE_NAMES, (W1, b1, W2, b2)))
    XQ, XK, XV, token_idx, Z = prepare_prefill(
        XQ, XK, XV, eta, params, lambda B, H, D: _state_shapes(B, H, D, _hidden_width(W1, D)),
        ln_weight, ln_bias, mini_batch_size, token_idx,
    )  # fmt: skip
    B, H, T, D = XQ.shape
    F = W1.shape[-1]
    # the kernel updates the state in place: float32 copies, never the caller's tensors
    state = [
        torch.empty(s, dtype=torch.float32, device=XQ.device).copy_(p)
        for s, p in zip(_state_shapes(B, H, D, F), (W1, b1, W2, b2))
    ]
    qk_precision, w_precision, grad_precision = precisions(XQ.dtype)
    _programs().ttt_mlp_prefill_kernel[(B * H,)](
        XQ,
        XK,
        XV,
        eta,
        *state,
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        token_idx.contiguous(),
        Z,
        T,
        H,
        eps,
        *XQ.stride()[:3],
        *Z.stride()[:3],
        *eta.stride(),
        D=D,
        F=F,
        FB=_chunk(F),
        MB=mini_batch_size,
        BLOCK_MB=mini_batch_block(mini_batch_size),
        QK_PRECISION=qk_precision,
        W_PRECISION=w_precision,
        GRAD_PRECISION=grad_precision,
        num_warps=num_warps(D),
    )
    return Z, *(s.to(p.dtype) for s, p in zip(state, (W1, b1, W2, b2)))


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
) -> Tensor:
    """One decoded token of TTT-MLP for a batch of sequences, updating `state` in place.

    Same result as `ops.ttt_mlp_step`, followed by `ops.commit_state` at the mini-batch's last
    position. xq, xk, xv: [B, H, 1, D]; eta: [B, H]; state = (W1, b1, W2, b2, grad_W1, grad_b1,
    grad_W2, grad_b2): [B, H, D, F], [B, H, 1, F], [B, H, F, D], [B, H, 1, D] and the same for
    the gradient sums, contiguous; position and token_idx as in `ttt_linear_decode`.
    Returns z: [B, H, 1, D] (written into `out` when given).
    """
    names = STATE_NAMES + tuple(f"grad_{n}" for n in STATE_NAMES)
    xq, xk, xv, out, b, (pos_ptr, pos_value, pos_from_ptr) = prepare_decode(
        xq, xk, xv, eta, state, names, lambda B, H, D: _state_shapes(B, H, D, _hidden_width(state[0], D)) * 2,
        position, ln_weight, ln_bias, token_idx, out,
    )  # fmt: skip
    B, H, _, D = xq.shape
    F = state[0].shape[-1]
    _programs().ttt_mlp_decode_kernel[(B * H,)](
        xq,
        xk,
        xv,
        eta,
        *state,
        pos_ptr,
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        token_idx.contiguous(),
        out,
        H,
        pos_value,
        eps,
        xq.stride(0),
        xq.stride(1),
        eta.stride(0),
        eta.stride(1),
        D=D,
        F=F,
        FB=_chunk(F),
        MB=b,
        POS_FROM_PTR=pos_from_ptr,
        num_warps=num_warps(D),
    )
    return out

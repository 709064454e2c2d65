"""TTT-Linear as Triton kernels: the prefill (mini-batch dual form, one fused program per head),
its backward for training, and the decode step (primal form), checked against `ttt_helpers.ops`,
their reference.

Supported: head dims 16, 32, 64, 128; mini_batch_size 1 to 64 (padded inside to a power of two
>= 16, the smallest tile `tl.dot` takes); XQ, XK, XV in float16, bfloat16 or float32; any T.
The state and all arithmetic are float32 inside; outputs keep the dtype of what they replace:
Z that of XQ, the final state that of W0 and b0 (pass a float32 W0 with bfloat16 inputs to
keep a float32 state across calls). `ttt_linear_prefill` runs forward only; `ttt_linear_train`
is the same op under autograd, its backward a second kernel (float64 inputs work there too).
Triton is imported at the first kernel launch, so this module loads without it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.kinds import KINDS, State
from ..ops.mini_batch import default_token_idx
from .common import (
    TRAIN_DTYPES,
    accumulator,
    check_decode,
    decode_buffers,
    launch_settings,
    norm_args,
    num_warps,
    prepare_prefill,
    strides,
    training_schedule,
)
from .cuda_graph import capture_step

LINEAR = KINDS["linear"]


def programs():
    """The Triton module of the TTT-Linear kernels, imported on first use."""
    from . import triton_ttt_linear

    return triton_ttt_linear


@torch.compiler.disable  # host-side checks and launches: a compiled model runs them eagerly
def ttt_linear_prefill(
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
    schedule: str = "fused",
) -> tuple[Tensor, Tensor, Tensor]:
    """`ops.ttt_linear` as one Triton kernel: one program per (batch, head) walks every mini-batch
    with the D x D state in registers.

    schedule "fused" computes Z inside that sequential walk; "split" leaves the walk only the
    state's recurrence, saving every mini-batch's start state (4 (D^2 + D) bytes per head and
    mini-batch), and computes Z in a second kernel parallel over the mini-batches, which shortens
    each step of the chain where few (batch, head) chains leave the GPU idle.

    XQ, XK, XV: [B, H, T, D] (any strides with a contiguous last dim, e.g. a [B, T, H, D] tensor
    transposed); eta: [B, H, T]; W0: [B, H, D, D], b0: [B, H, 1, D] (may be expanded over B);
    ln_weight, ln_bias: [H, D]; token_idx: [mini_batch_size], default 1/(1..b) in float32.
    Returns Z: [B, H, T, D] in XQ's dtype and layout, W_T: [B, H, D, D] and b_T: [B, H, 1, D]
    in W0's and b0's dtypes.
    """
    if schedule not in ("fused", "split"):
        raise ValueError(f"schedule must be 'fused' or 'split', got {schedule!r}")
    XQ, XK, XV, token_idx, Z = prepare_prefill(
        XQ, XK, XV, eta, LINEAR, (W0, b0), ln_weight, ln_bias, mini_batch_size, token_idx
    )
    return _launch_prefill(
        XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, mini_batch_size, token_idx, eps, Z,
        save_states=schedule == "split", schedule=schedule,
    )[:3]  # fmt: skip


def _launch_prefill(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    W0: Tensor,
    b0: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor,
    eps: float,
    Z: Tensor,
    *,
    save_states: bool = False,
    schedule: str = "split",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Run the prefill kernel on checked arguments, writing Z. Returns Z, W_T, b_T and, when
    save_states, the start state of every mini-batch: W [B, H, NC, D, D], b [B, H, NC, D]. With
    schedule "split" the sequential kernel then only updates the state and
    ttt_linear_output_kernel, parallel over mini-batches, computes Z from the saved states;
    "fused" computes Z in the sequential kernel."""
    B, H, T, D = XQ.shape
    W_T = torch.empty((B, H, D, D), dtype=W0.dtype, device=XQ.device)
    b_T = torch.empty((B, H, 1, D), dtype=b0.dtype, device=XQ.device)
    acc = accumulator(XQ.dtype)[0]
    NC = -(-T // mini_batch_size)
    W_start = torch.empty((B, H, NC, D, D), dtype=acc, device=XQ.device) if save_states else W_T
    b_start = torch.empty((B, H, NC, D), dtype=acc, device=XQ.device) if save_states else b_T
    write_z = not save_states or schedule == "fused"
    inputs = dict(XQ=XQ, XK=XK, XV=XV, ETA=eta, **norm_args(ln_weight, ln_bias, token_idx), Z=Z, T=T, H=H, eps=eps)
    shared = dict(**strides("sx", XQ), **strides("sz", Z), **strides("se", eta))
    settings = launch_settings(XQ.dtype, D, mini_batch_size)
    programs().ttt_linear_prefill_kernel[(B * H,)](
        **inputs, W0=W0, B0=b0, W_OUT=W_T, B_OUT=b_T, W_START=W_start, B_START=b_start,
        **shared, **strides("sw", W0, "bhrc"), sb_b=b0.stride(0), sb_h=b0.stride(1), sb_d=b0.stride(3),
        SAVE_STATES=save_states, WRITE_Z=write_z, **settings,
    )  # fmt: skip
    if write_z:
        return Z, W_T, b_T, (W_start if save_states else None), (b_start if save_states else None)
    programs().ttt_linear_output_kernel[(NC, B * H)](**inputs, W_START=W_start, B_START=b_start, **shared, **settings)
    return Z, W_T, b_T, W_start, b_start


class TTTLinearFunction(torch.autograd.Function):
    """`ops.ttt_linear` under autograd: forward and backward are Triton kernels.

    The forward is the prefill kernel, which also saves the state at the start of every
    mini-batch: W in [B, H, NC, D, D] and b in [B, H, NC, D] float32 (float64 for float64
    inputs), NC = ceil(T / mini_batch_size); the backward recomputes everything else inside a
    mini-batch (z1, the gradient, the dual form's products, LN statistics) from its start state.

    Two schedules (`common.training_schedule`). "split": the forward's sequential kernel only
    updates the state and saves it, and ttt_linear_output_kernel computes Z for every mini-batch
    in parallel; the backward is three kernels, so that the sequential part does as little as
    possible per mini-batch: ttt_linear_bwd_local_kernel (parallel: what does not depend on the
    adjoint of the state), ttt_linear_bwd_state_kernel (sequential: the adjoint through the
    mini-batches in reverse) and ttt_linear_bwd_inputs_kernel (parallel: every input gradient).
    "fused": the forward's sequential kernel also writes Z, and the backward is
    ttt_linear_bwd_inputs_kernel alone, one program per chain walking the mini-batches in reverse
    with the adjoint in registers.
    """

    @staticmethod
    def forward(ctx, XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, token_idx, mini_batch_size, eps, schedule):
        XQ, XK, XV, token_idx, Z = prepare_prefill(
            XQ, XK, XV, eta, LINEAR, (W0, b0), ln_weight, ln_bias, mini_batch_size, token_idx, TRAIN_DTYPES
        )
        schedule = training_schedule(schedule, XQ)
        Z, W_T, b_T, W_start, b_start = _launch_prefill(
            XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, mini_batch_size, token_idx, eps, Z,
            save_states=True, schedule=schedule,
        )  # fmt: skip
        ctx.save_for_backward(XQ, XK, XV, eta, ln_weight, ln_bias, token_idx, W_start, b_start)
        ctx.mini_batch_size, ctx.eps, ctx.state_dtypes = mini_batch_size, eps, (W0.dtype, b0.dtype)
        ctx.schedule = schedule
        return Z, W_T, b_T

    @staticmethod
    def backward(ctx, dZ, dW_T, db_T):
        XQ, XK, XV, eta, ln_weight, ln_bias, token_idx, W_start, b_start = ctx.saved_tensors
        B, H, T, D = XQ.shape
        b = ctx.mini_batch_size
        NC = W_start.shape[2]
        acc = accumulator(XQ.dtype)[0]
        dZ = dZ if dZ.stride(-1) == 1 else dZ.contiguous()
        settings = launch_settings(XQ.dtype, D, b)
        norm = norm_args(ln_weight, ln_bias, token_idx)
        dW = torch.empty((B, H, D, D), dtype=acc, device=XQ.device).copy_(dW_T)  # becomes the gradient of W0
        db = torch.empty((B, H, D), dtype=acc, device=XQ.device).copy_(db_T.view(B, H, D))
        if ctx.schedule == "fused":
            dW_end, db_end, grid = dW, db, (1, B * H)  # one sequential pass carries the adjoint itself
        else:
            dW_end, db_end = _adjoint_at_ends(XQ, XK, XV, eta, W_start, b_start, norm, dZ, dW, db, ctx.eps, settings)
            grid = (NC, B * H)
        # the gradients of the inputs: per mini-batch in parallel (split) or in reverse (fused)
        dXQ, dXK, dXV = (torch.empty((B, H, T, D), dtype=x.dtype, device=XQ.device) for x in (XQ, XK, XV))
        deta = torch.empty((B, H, T), dtype=eta.dtype, device=XQ.device)
        dln_w, dln_b = (torch.empty((B * H * NC, D), dtype=acc, device=XQ.device) for _ in range(2))
        dtoken_idx = torch.empty((B * H * NC, settings["BLOCK_MB"]), dtype=acc, device=XQ.device)
        programs().ttt_linear_bwd_inputs_kernel[grid](
            XQ=XQ, XK=XK, XV=XV, ETA=eta, W_START=W_start, B_START=b_start, **norm, DZ=dZ, DW_END=dW_end,
            DB_END=db_end, DW=dW, DB=db, DXQ=dXQ, DXK=dXK, DXV=dXV, DETA=deta, DLN_W=dln_w, DLN_B=dln_b,
            DTOKEN_IDX=dtoken_idx, T=T, H=H, eps=ctx.eps, **strides("sx", XQ), **strides("sd", dZ),
            **strides("sg", dXQ), **strides("se", eta), SEQUENTIAL=ctx.schedule == "fused", **settings,
        )  # fmt: skip
        W_dtype, b_dtype = ctx.state_dtypes
        dln = (d.view(B, H, NC, D).sum((0, 2)).to(p.dtype) for d, p in ((dln_w, ln_weight), (dln_b, ln_bias)))
        dW0, db0 = dW.to(W_dtype), db.view(B, H, 1, D).to(b_dtype)
        return dXQ, dXK, dXV, deta, dW0, db0, *dln, dtoken_idx.sum(0)[:b].to(token_idx.dtype), None, None, None


def _adjoint_at_ends(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    W_start: Tensor,
    b_start: Tensor,
    norm: dict[str, Tensor],
    dZ: Tensor,
    dW: Tensor,
    db: Tensor,
    eps: float,
    settings: dict[str, object],
) -> tuple[Tensor, Tensor]:
    """The first two kernels of the split backward: per mini-batch in parallel, what the adjoint
    recurrence reads (dz, -M^T dz, LN-L2-grad's rows); then the adjoint of the state through the
    mini-batches in reverse, one program per (batch, head), from dW, db (the gradient of the final
    state, left holding that of the initial one). Returns the adjoint at every mini-batch end:
    [B * H, NC, D, D] and [B * H, NC, D]."""
    B, H, T, D = XQ.shape
    NC, acc = W_start.shape[2], dW.dtype
    local = torch.empty((4, B * H, T, D), dtype=acc, device=XQ.device)
    stats = torch.empty((3, B * H, T), dtype=acc, device=XQ.device)
    tiles = dict(zip(("DZ_LOCAL", "DGRAD_LOCAL", "Z_HAT1", "G_HAT"), local), STATS=stats)
    sizes = dict(T=T, BH=B * H, H=H)
    programs().ttt_linear_bwd_local_kernel[(NC, B * H)](
        XQ=XQ, XK=XK, XV=XV, ETA=eta, W_START=W_start, B_START=b_start, **norm, DZ=dZ, **tiles, **sizes, eps=eps,
        **strides("sx", XQ), **strides("sd", dZ), **strides("se", eta), **settings,
    )  # fmt: skip
    dW_end = torch.empty((B * H, NC, D, D), dtype=acc, device=XQ.device)
    db_end = torch.empty((B * H, NC, D), dtype=acc, device=XQ.device)
    chain = {k: settings[k] for k in ("D", "MB", "BLOCK_MB", "GRAD_PRECISION", "ACC", "num_warps")}
    programs().ttt_linear_bwd_state_kernel[(B * H,)](
        XQ=XQ, XK=XK, ETA=eta, LN_W=norm["LN_W"], TOKEN_IDX=norm["TOKEN_IDX"], **tiles, DW=dW, DB=db,
        DW_END=dW_end, DB_END=db_end, **sizes, **strides("sx", XQ), **strides("se", eta), num_stages=2, **chain,
    )  # fmt: skip
    return dW_end, db_end


@torch.compiler.disable  # host-side checks and launches: a compiled model runs them eagerly
def ttt_linear_train(
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
    *,
    schedule: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """`ops.ttt_linear` with a Triton forward and backward (`TTTLinearFunction`): what training runs.

    Arguments and results as in `ttt_linear_prefill`; dtypes float16, bfloat16, float32 or
    float64. Gradients reach XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias and token_idx, and a
    gradient on the returned final state flows back (a streamed segment whose state is used later).
    schedule: "auto", "fused" or "split", how the kernels divide the work (`common.training_schedule`);
    the results are the same.
    """
    if token_idx is None:
        token_idx = default_token_idx(mini_batch_size, device=XQ.device if isinstance(XQ, Tensor) else None)
    return TTTLinearFunction.apply(
        XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, token_idx, mini_batch_size, eps, schedule
    )


@torch.compiler.disable  # host-side checks and launches: a compiled model runs them eagerly
def ttt_linear_decode(
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
    """One decoded token of TTT-Linear for a batch of sequences, updating `state` in place.

    Same result as `ops.decode_step`: `ops.ttt_linear_step`, followed by `ops.commit_state` when
    the token closes its mini-batch (position == mini_batch_size - 1). xq, xk, xv: [B, H, 1, D];
    eta: [B, H]; state = (W, b, grad_W, grad_b): [B, H, D, D], [B, H, 1, D], [B, H, D, D], [B, H, 1, D],
    contiguous; position: the token's index in its mini-batch, an int, or an integer tensor on
    the device with one element or one per row [B] (each row at its own position, as in
    `ops.decode_step`); a tensor is read there, so the step can be replayed in a CUDA graph, and
    its range is not checked; token_idx: [mini_batch_size]. Returns z: [B, H, 1, D] (written into
    `out` when given). check=False skips the checks of arguments a caller has checked already.
    """
    if check:
        check_decode(xq, xk, xv, eta, LINEAR, state, position, ln_weight, ln_bias, token_idx, out)
    xq, xk, xv, out, pos = decode_buffers(xq, xk, xv, position, token_idx, out)
    B, H, _, D = xq.shape
    W, bias, grad_W, grad_b = state
    programs().ttt_linear_decode_kernel[(B * H,)](
        XQ=xq, XK=xk, XV=xv, ETA=eta, W=W, Bv=bias, GW=grad_W, GB=grad_b, **pos, **norm_args(ln_weight, ln_bias, token_idx),
        Z=out, H=H, eps=eps, **strides("sx", xq, "bh"), **strides("se", eta, "bh"),
        D=D, MB=token_idx.shape[0], ROWS=min(D, 32), num_warps=num_warps(D),
    )  # fmt: skip
    return out


class TTTLinearDecoder:
    """Decode TTT-Linear one token at a time for a batch of sequences; on a GPU each step is
    replayed from a CUDA graph, so launch overhead does not dominate.

    state = (W, b, grad_W, grad_b) as in `ttt_linear_decode`, updated in place; position: the
    index in the current mini-batch of the next token. The graph is captured at the first `step`
    for the shapes it gets; `step` then returns the same output buffer every time (clone it to
    keep a result past the next step), and inputs already written into `self.inputs` are not
    copied again. On the CPU (the Triton interpreter) steps run eagerly.
    """

    def __init__(
        self,
        state: State,
        position: int,
        ln_weight: Tensor,
        ln_bias: Tensor,
        token_idx: Tensor,
        eps: float = 1e-6,
        *,
        use_graph: bool | None = None,
    ) -> None:
        if not 0 <= position < token_idx.shape[0]:
            raise ValueError(f"position must be in [0, {token_idx.shape[0]}), got {position}")
        self.state, self.ln_weight, self.ln_bias, self.token_idx, self.eps = state, ln_weight, ln_bias, token_idx, eps
        self.position = torch.tensor([position], dtype=torch.int32, device=state[0].device)
        self.use_graph = state[0].is_cuda if use_graph is None else use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self, xq: Tensor, xk: Tensor, xv: Tensor, eta: Tensor) -> Tensor:
        z = ttt_linear_decode(
            xq, xk, xv, eta, self.state, self.position, self.ln_weight, self.ln_bias, self.token_idx, self.eps
        )
        self.position.add_(1).remainder_(self.token_idx.shape[0])  # on the device: no host sync
        return z

    def step(self, xq: Tensor, xk: Tensor, xv: Tensor, eta: Tensor) -> Tensor:
        """xq, xk, xv: [B, H, 1, D]; eta: [B, H] -> z: [B, H, 1, D]; advances state and position."""
        if not self.use_graph:
            return self._step(xq, xk, xv, eta)
        if self.graph is None:
            self._capture(xq, xk, xv, eta)
        for buffer, x in zip(self.inputs, (xq, xk, xv, eta)):
            if x is not buffer:
                buffer.copy_(x)
        self.graph.replay()
        return self.output

    def _capture(self, *example: Tensor) -> None:
        """Record one step on copies of the example inputs (see `capture_step`)."""
        self.inputs = tuple(x.clone() for x in example)
        self.graph, self.output = capture_step(lambda: self._step(*self.inputs), [*self.state, self.position])

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

from .. import ops
from .common import (
    TRAIN_DTYPES,
    accumulator,
    kernel_applies,
    mini_batch_block,
    needs_grad,
    num_warps,
    precisions,
    prepare_decode,
    prepare_prefill,
    training_schedule,
)
from .graph_decode import capture_step

State = tuple[Tensor, ...]


def _programs():
    """The Triton module, imported on first use."""
    from . import triton_ttt_linear

    return triton_ttt_linear


def _state_shapes(B: int, H: int, D: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of W and b."""
    return (B, H, D, D), (B, H, 1, D)


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
        XQ, XK, XV, eta, {"W0": W0, "b0": b0}, _state_shapes, ln_weight, ln_bias, mini_batch_size, token_idx
    )
    split = schedule == "split"
    return _launch_prefill(
        XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, mini_batch_size, token_idx, eps, Z,
        save_states=split, schedule=schedule,
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
    schedule "split" the sequential kernel then only updates the state and a second one, parallel
    over mini-batches, computes Z from the saved states (a training forward with few (batch, head)
    chains is short of programs); "fused" computes Z in the sequential kernel."""
    B, H, T, D = XQ.shape
    W_T = torch.empty((B, H, D, D), dtype=W0.dtype, device=XQ.device)
    b_T = torch.empty((B, H, 1, D), dtype=b0.dtype, device=XQ.device)
    acc, acc_tl = accumulator(XQ.dtype)
    NC = -(-T // mini_batch_size)
    W_start = torch.empty((B, H, NC, D, D), dtype=acc, device=XQ.device) if save_states else W_T
    b_start = torch.empty((B, H, NC, D), dtype=acc, device=XQ.device) if save_states else b_T
    qk_precision, w_precision, grad_precision = precisions(XQ.dtype)
    write_z = not save_states or schedule == "fused"
    _programs().ttt_linear_prefill_kernel[(B * H,)](
        XQ,
        XK,
        XV,
        eta,
        W0,
        b0,
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        token_idx.contiguous(),
        Z,
        W_T,
        b_T,
        W_start,
        b_start,
        T,
        H,
        eps,
        *XQ.stride()[:3],
        *Z.stride()[:3],
        *eta.stride(),
        *W0.stride(),
        b0.stride(0),
        b0.stride(1),
        b0.stride(3),
        D=D,
        MB=mini_batch_size,
        BLOCK_MB=mini_batch_block(mini_batch_size),
        QK_PRECISION=qk_precision,
        W_PRECISION=w_precision,
        GRAD_PRECISION=grad_precision,
        SAVE_STATES=save_states,
        WRITE_Z=write_z,
        ACC=acc_tl,
        num_warps=num_warps(D),
    )
    if write_z:
        return Z, W_T, b_T, (W_start if save_states else None), (b_start if save_states else None)
    _programs().ttt_linear_output_kernel[(NC, B * H)](
        XQ, XK, XV, eta, W_start, b_start, ln_weight.contiguous(), ln_bias.contiguous(), token_idx.contiguous(), Z,
        T, H, eps, *XQ.stride()[:3], *Z.stride()[:3], *eta.stride(),
        D=D, MB=mini_batch_size, BLOCK_MB=mini_batch_block(mini_batch_size), QK_PRECISION=qk_precision,
        W_PRECISION=w_precision, GRAD_PRECISION=grad_precision, ACC=acc_tl, num_warps=num_warps(D),
    )  # fmt: skip
    return Z, W_T, b_T, W_start, b_start


class TTTLinearFunction(torch.autograd.Function):
    """`ops.ttt_linear` under autograd: forward and backward are Triton kernels.

    The forward is the prefill kernel, which also saves the state at the start of every
    mini-batch: W in [B, H, NC, D, D] and b in [B, H, NC, D] float32 (float64 for float64
    inputs), NC = ceil(T / mini_batch_size). That is 4 (D^2 + D) / b bytes per token and head,
    1040 B at D = 64, b = 16: 2.7 times the bf16 XQ, XK, XV it also keeps. Why every start
    state: the backward needs each one, and rebuilding them from every k-th would run the forward
    of k - 1 mini-batches again per k, a second forward in all, to save memory that is small next
    to what a model's training step holds anyway. Everything else inside a mini-batch (z1, the
    gradient, the dual form's products, LN statistics) is recomputed from its start state.

    Two schedules (`common.training_schedule`). "split", for fewer (batch, head) chains than half
    the GPU's SMs: the forward's sequential kernel only updates the state and saves it, and
    ttt_linear_output_kernel computes Z for every mini-batch in parallel; the backward is three
    kernels, so that the sequential part (one program per (batch, head)) does as little as
    possible per mini-batch:
    1. ttt_linear_bwd_local_kernel, parallel over mini-batches: from each start state, the terms
       that do not depend on the adjoint of the state (dz through the output LN, -M^T dz, and
       the rows of LN-L2-grad(z1)), written out as [B * H, T, D] tiles;
    2. ttt_linear_bwd_state_kernel walks the mini-batches in reverse carrying the adjoint (dW, db)
       in registers, from the gradient that arrives on the final state (zero when W_T, b_T are
       not used); per step two products with dW and a row-wise LN backward, and it saves the
       adjoint at every mini-batch end ([B * H, NC, D, D], as large as the saved states);
    3. ttt_linear_bwd_inputs_kernel, parallel over mini-batches: from the start state and the
       adjoint at the end, every input gradient of the mini-batch.
    "fused", once the B * H chains alone keep half the SMs busy: the forward's sequential kernel also
    writes Z, and the backward is ttt_linear_bwd_inputs_kernel alone, one program per chain
    walking the mini-batches in reverse with the adjoint in registers. It does about 14 products
    of [b, D] tiles per step of the chain where the split's step 2 has 3, but writes and reads no
    intermediates: with every SM busy anyway, the split's parallelism gains nothing and its
    memory traffic costs (measured in benchmarks/results/backward_h200.json).
    """

    @staticmethod
    def forward(ctx, XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, token_idx, mini_batch_size, eps, schedule):
        XQ, XK, XV, token_idx, Z = prepare_prefill(
            XQ, XK, XV, eta, {"W0": W0, "b0": b0}, _state_shapes, ln_weight, ln_bias, mini_batch_size, token_idx,
            TRAIN_DTYPES,
        )  # fmt: skip
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
        acc, acc_tl = accumulator(XQ.dtype)
        device = XQ.device
        dZ = dZ if dZ.stride(-1) == 1 else dZ.contiguous()
        ln_weight, ln_bias, token_idx = ln_weight.contiguous(), ln_bias.contiguous(), token_idx.contiguous()
        block = mini_batch_block(b)
        qk_precision, w_precision, grad_precision = precisions(XQ.dtype)
        consts = dict(D=D, MB=b, BLOCK_MB=block, ACC=acc_tl, num_warps=num_warps(D))
        programs = _programs()

        precision = dict(QK_PRECISION=qk_precision, W_PRECISION=w_precision, GRAD_PRECISION=grad_precision)
        dW = torch.empty((B, H, D, D), dtype=acc, device=device).copy_(dW_T)  # becomes the gradient of W0
        db = torch.empty((B, H, D), dtype=acc, device=device).copy_(db_T.view(B, H, D))
        if ctx.schedule == "fused":
            dW_end, db_end, grid = dW, db, (1, B * H)  # one sequential pass carries the adjoint itself
        else:
            # 1. per mini-batch, in parallel: what the adjoint recurrence reads (dz, -M^T dz, LN-L2-grad's rows)
            local = torch.empty((4, B * H, T, D), dtype=acc, device=device)
            stats = torch.empty((3, B * H, T), dtype=acc, device=device)
            programs.ttt_linear_bwd_local_kernel[(NC, B * H)](
                XQ, XK, XV, eta, W_start, b_start, ln_weight, ln_bias, token_idx, dZ, *local, stats,
                T, B * H, H, ctx.eps, *XQ.stride()[:3], *dZ.stride()[:3], *eta.stride(), **precision, **consts,
            )  # fmt: skip
            # 2. the adjoint of the state through the mini-batches in reverse, one program per (batch, head)
            dW_end = torch.empty((B * H, NC, D, D), dtype=acc, device=device)
            db_end = torch.empty((B * H, NC, D), dtype=acc, device=device)
            programs.ttt_linear_bwd_state_kernel[(B * H,)](
                XQ, XK, eta, ln_weight, token_idx, *local, stats, dW, db, dW_end, db_end,
                T, B * H, H, *XQ.stride()[:3], *eta.stride(),
                GRAD_PRECISION=grad_precision, num_stages=2, **consts,
            )  # fmt: skip
            del local, stats
            grid = (NC, B * H)
        # 3. the gradients of the inputs: per mini-batch in parallel (split) or in reverse (fused)
        dXQ, dXK, dXV = (torch.empty((B, H, T, D), dtype=x.dtype, device=device) for x in (XQ, XK, XV))
        deta = torch.empty((B, H, T), dtype=eta.dtype, device=device)
        dln_w, dln_b = (torch.empty((B * H * NC, D), dtype=acc, device=device) for _ in range(2))
        dtoken_idx = torch.empty((B * H * NC, block), dtype=acc, device=device)
        programs.ttt_linear_bwd_inputs_kernel[grid](
            XQ, XK, XV, eta, W_start, b_start, ln_weight, ln_bias, token_idx, dZ, dW_end, db_end, dW, db,
            dXQ, dXK, dXV, deta, dln_w, dln_b, dtoken_idx,
            T, H, ctx.eps, *XQ.stride()[:3], *dZ.stride()[:3], *dXQ.stride()[:3], *eta.stride(),
            SEQUENTIAL=ctx.schedule == "fused", **precision, **consts,
        )  # fmt: skip
        W_dtype, b_dtype = ctx.state_dtypes
        return (
            dXQ,
            dXK,
            dXV,
            deta,
            dW.to(W_dtype),
            db.view(B, H, 1, D).to(b_dtype),
            dln_w.view(B, H, NC, D).sum((0, 2)).to(ln_weight.dtype),
            dln_b.view(B, H, NC, D).sum((0, 2)).to(ln_bias.dtype),
            dtoken_idx.sum(0)[:b].to(token_idx.dtype),
            None,
            None,
            None,
        )


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
        token_idx = ops.default_token_idx(mini_batch_size, device=XQ.device if isinstance(XQ, Tensor) else None)
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
) -> Tensor:
    """One decoded token of TTT-Linear for a batch of sequences, updating `state` in place.

    Same result as `ops.decode_step`: `ops.ttt_linear_step`, followed by `ops.commit_state` when
    the token closes its mini-batch (position == mini_batch_size - 1). xq, xk, xv: [B, H, 1, D];
    eta: [B, H]; state = (W, b, grad_W, grad_b): [B, H, D, D], [B, H, 1, D], [B, H, D, D], [B, H, 1, D],
    contiguous; position: the token's index in its mini-batch, an int, or an integer tensor on
    the device with one element or one per row [B] (each row at its own position, as in
    `ops.decode_step`); a tensor is read there, so the step can be replayed in a CUDA graph, and
    its range is not checked; token_idx: [mini_batch_size]. Returns z: [B, H, 1, D] (written into
    `out` when given).
    """
    names = ("W", "b", "grad_W", "grad_b")
    xq, xk, xv, out, b, (pos_ptr, pos_value, pos_from_ptr, pos_stride) = prepare_decode(
        xq, xk, xv, eta, state, names, lambda B, H, D: _state_shapes(B, H, D) * 2,
        position, ln_weight, ln_bias, token_idx, out,
    )  # fmt: skip
    B, H, _, D = xq.shape
    W, bias, grad_W, grad_b = state
    _programs().ttt_linear_decode_kernel[(B * H,)](
        xq,
        xk,
        xv,
        eta,
        W,
        bias,
        grad_W,
        grad_b,
        pos_ptr,
        ln_weight.contiguous(),
        ln_bias.contiguous(),
        token_idx.contiguous(),
        out,
        H,
        pos_value,
        pos_stride,
        eps,
        xq.stride(0),
        xq.stride(1),
        eta.stride(0),
        eta.stride(1),
        D=D,
        MB=b,
        ROWS=min(D, 32),
        POS_FROM_PTR=pos_from_ptr,
        num_warps=num_warps(D),
    )
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


def ttt_linear_auto(
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
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """`ops.ttt_linear` through the kernels where they can run, else the reference; same arguments.

    impl: "auto" picks the kernels for CUDA tensors when triton is importable and the shape is
    supported; "kernel" and "reference" force one path. The kernel path is the prefill when no
    gradient is needed and `ttt_linear_train` when one is.
    """
    if impl not in ("auto", "kernel", "reference"):
        raise ValueError(f"impl must be 'auto', 'kernel' or 'reference', got {impl!r}")
    if impl == "auto":
        impl = "kernel" if kernel_applies(XQ, mini_batch_size) else "reference"
    if impl == "kernel":
        grads = needs_grad((XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, token_idx))
        op = ttt_linear_train if grads else ttt_linear_prefill
    else:
        op = ops.ttt_linear
    return op(XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, mini_batch_size, token_idx, eps)

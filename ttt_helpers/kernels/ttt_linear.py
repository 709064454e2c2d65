"""TTT-Linear as Triton kernels: the prefill (mini-batch dual form, one fused program per head)
and the decode step (primal form), checked against `ttt_helpers.ops`, their reference.

Supported: head dims 16, 32, 64, 128; mini_batch_size 1 to 64 (padded inside to a power of two
>= 16, the smallest tile `tl.dot` takes); XQ, XK, XV in float16, bfloat16 or float32; any T.
The state and all arithmetic are float32 inside; outputs keep the dtype of what they replace:
Z that of XQ, the final state that of W0 and b0 (pass a float32 W0 with bfloat16 inputs to
keep a float32 state across calls). The kernels run forward only (no autograd).
Triton is imported at the first kernel launch, so this module loads without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from .. import ops
from .graph_decode import capture_step

State = tuple[Tensor, ...]

HEAD_DIMS = (16, 32, 64, 128)
MAX_MINI_BATCH = 64
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISION_16BIT = ("tf32", "bf16")  # tl.dot precisions (W products, gradient products), 16-bit inputs


def triton_available() -> bool:
    """True when triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_kernels(tensor: Tensor) -> bool:
    """True when `tensor` is on a CUDA device and triton is importable: the kernels can run."""
    return tensor.is_cuda and triton_available()


def needs_grad(tensors: tuple[object, ...]) -> bool:
    """True when autograd would track an op on `tensors`: the kernels have no backward pass."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def kernel_applies(XQ: Tensor, mini_batch_size: int, tensors: tuple[object, ...]) -> bool:
    """The automatic choice: the kernel runs for CUDA inputs of a supported shape and dtype when
    triton is importable and no gradient is needed; the reference op everywhere else."""
    supported = (
        XQ.dim() == 4
        and XQ.dtype in INPUT_DTYPES
        and XQ.shape[-1] in HEAD_DIMS
        and 1 <= mini_batch_size <= MAX_MINI_BATCH
    )
    return supported and use_kernels(XQ) and not needs_grad(tensors)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _programs():
    """The Triton module, imported on first use."""
    from . import triton_ttt_linear

    return triton_ttt_linear


def _precisions(dtype: torch.dtype) -> tuple[str, str, str]:
    """tl.dot precisions of xq xk^T, of the products with the state W, of those with the gradients.

    float32 inputs: full float32 products. 16-bit inputs: xq xk^T in their own type (exact), the
    W products in tf32 and the gradient products in bf16 (PRECISION_16BIT). Rounding W to bf16
    lets the error of Z grow with T (past 5e-3 at T = 64k on an H100), tf32 keeps it near the
    output's own bf16 rounding for 10 to 15% more time (benchmarks/README.md). The interpreter's
    tl.dot mishandles 16-bit operands (triton 3.9), so it computes everything in float32.
    """
    if dtype == torch.float32 or _interpreting():
        return "ieee", "ieee", "ieee"
    return ("bf16" if dtype == torch.bfloat16 else "fp16"), *PRECISION_16BIT


def _num_warps(D: int) -> int:
    return {16: 2, 32: 2, 64: 4, 128: 8}[D]


def _check_device(tensor: Tensor, name: str) -> None:
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and _interpreting())):
        raise ValueError(
            f"{name} must be on a CUDA device (or on the CPU with TRITON_INTERPRET=1 set before triton "
            f"is imported), got {tensor.device}"
        )
    if not triton_available():
        raise ValueError("the Triton kernels need the triton package: pip install triton")


def _check_tensors(expected: dict[str, tuple[object, tuple[int, ...]]], device: torch.device) -> None:
    """Each entry name: (tensor, shape) must be a floating tensor of that shape on `device`."""
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            got = f"shape {list(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape {list(shape)}, got {got}")
        if tensor.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on device {device} like XQ, got {tensor.device}")


def _same_strides(XQ: Tensor, XK: Tensor, XV: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One set of strides serves the three: copy only if they disagree."""
    if XQ.stride(-1) != 1 or XK.stride() != XQ.stride() or XV.stride() != XQ.stride():
        return XQ.contiguous(), XK.contiguous(), XV.contiguous()
    return XQ, XK, XV


def _check_common(XQ: Tensor, mini_batch_size: int, name: str = "XQ") -> None:
    """Checks shared by both kernels: XQ's rank, dtype, head dim and device; the mini-batch size."""
    if not isinstance(XQ, Tensor) or XQ.dim() != 4:
        got = list(XQ.shape) if isinstance(XQ, Tensor) else type(XQ).__name__
        raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {got}")
    if XQ.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {XQ.dtype}")
    if XQ.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim D = {name}.shape[-1] must be one of {HEAD_DIMS}, got {XQ.shape[-1]}")
    b = mini_batch_size
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_MINI_BATCH:
        raise ValueError(f"mini_batch_size must be an int in [1, {MAX_MINI_BATCH}], got {mini_batch_size!r}")
    _check_device(XQ, name)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """`ops.ttt_linear` as one Triton kernel: one program per (batch, head) walks every mini-batch
    with the D x D state in registers.

    XQ, XK, XV: [B, H, T, D] (any strides with a contiguous last dim, e.g. a [B, T, H, D] tensor
    transposed); eta: [B, H, T]; W0: [B, H, D, D], b0: [B, H, 1, D] (may be expanded over B);
    ln_weight, ln_bias: [H, D]; token_idx: [mini_batch_size], default 1/(1..b) in float32.
    Returns Z: [B, H, T, D] in XQ's dtype and layout, W_T: [B, H, D, D] and b_T: [B, H, 1, D]
    in W0's and b0's dtypes.
    """
    _check_common(XQ, mini_batch_size)
    B, H, T, D = XQ.shape
    if T == 0:
        raise ValueError("XQ must hold at least one token (T >= 1), got T = 0")
    if token_idx is None:
        token_idx = ops.default_token_idx(mini_batch_size, device=XQ.device)
    _check_tensors(
        {
            "XK": (XK, (B, H, T, D)),
            "XV": (XV, (B, H, T, D)),
            "eta": (eta, (B, H, T)),
            "W0": (W0, (B, H, D, D)),
            "b0": (b0, (B, H, 1, D)),
            "ln_weight": (ln_weight, (H, D)),
            "ln_bias": (ln_bias, (H, D)),
            "token_idx": (token_idx, (mini_batch_size,)),
        },
        XQ.device,
    )
    for name, x in (("XK", XK), ("XV", XV)):
        if x.dtype != XQ.dtype:
            raise ValueError(f"{name} must have dtype {XQ.dtype} like XQ, got {x.dtype}")
    inputs = (XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, token_idx)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise ValueError("the Triton kernel has no backward: call it under torch.no_grad() or use ops.ttt_linear")
    XQ, XK, XV = _same_strides(XQ, XK, XV)
    Z = torch.empty_like(XQ)  # keeps a dense XQ's layout: a [B, T, H, D] view stays one
    W_T = torch.empty((B, H, D, D), dtype=W0.dtype, device=XQ.device)
    b_T = torch.empty((B, H, 1, D), dtype=b0.dtype, device=XQ.device)
    block = max(16, 1 << (mini_batch_size - 1).bit_length())
    qk_precision, w_precision, grad_precision = _precisions(XQ.dtype)
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
        BLOCK_MB=block,
        QK_PRECISION=qk_precision,
        W_PRECISION=w_precision,
        GRAD_PRECISION=grad_precision,
        num_warps=_num_warps(D),
    )
    return Z, W_T, b_T


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

    Same result as `ops.ttt_linear_step`, followed by `ops.commit_state` when the token closes
    its mini-batch (position == mini_batch_size - 1). xq, xk, xv: [B, H, 1, D]; eta: [B, H];
    state = (W, b, grad_W, grad_b): [B, H, D, D], [B, H, 1, D], [B, H, D, D], [B, H, 1, D],
    contiguous; position: the token's index in its mini-batch, an int or a one-element integer
    tensor on the device (read there, so the step can be replayed in a CUDA graph; its range is
    then not checked); token_idx: [mini_batch_size]. Returns z: [B, H, 1, D] (written into `out`
    when given).
    """
    b = token_idx.shape[0] if isinstance(token_idx, Tensor) and token_idx.dim() == 1 else 0
    _check_common(xq, max(b, 1), "xq")
    B, H, one, D = xq.shape
    if one != 1:
        raise ValueError(f"xq must hold one token [B, H, 1, D], got {list(xq.shape)}")
    if not isinstance(state, tuple) or len(state) != 4:
        raise ValueError(f"state must be a tuple (W, b, grad_W, grad_b), got {type(state).__name__}")
    W, bias, grad_W, grad_b = state
    _check_tensors(
        {
            "xk": (xk, (B, H, 1, D)),
            "xv": (xv, (B, H, 1, D)),
            "eta": (eta, (B, H)),
            "state[0] (W)": (W, (B, H, D, D)),
            "state[1] (b)": (bias, (B, H, 1, D)),
            "state[2] (grad_W)": (grad_W, (B, H, D, D)),
            "state[3] (grad_b)": (grad_b, (B, H, 1, D)),
            "ln_weight": (ln_weight, (H, D)),
            "ln_bias": (ln_bias, (H, D)),
            "token_idx": (token_idx, (b,)),
        },
        xq.device,
    )
    for i, (name, t) in enumerate(zip(("W", "b", "grad_W", "grad_b"), state)):
        if not t.is_contiguous():
            raise ValueError(f"state[{i}] ({name}) must be contiguous to be updated in place; pass {name}.contiguous()")
    if isinstance(position, Tensor):
        if position.numel() != 1 or position.dtype not in (torch.int32, torch.int64) or position.device != xq.device:
            raise ValueError(
                f"position must be an int or a one-element int tensor on {xq.device}, "
                f"got {position.dtype} {list(position.shape)} on {position.device}"
            )
        pos_ptr, pos_value = position, 0
    elif isinstance(position, int) and not isinstance(position, bool) and 0 <= position < b:
        pos_ptr, pos_value = token_idx, position  # the pointer is unused when the value is given
    else:
        raise ValueError(f"position must be in [0, {b}), got {position!r}")
    xq, xk, xv = _same_strides(xq, xk, xv)
    if out is None:
        out = torch.empty((B, H, 1, D), dtype=xq.dtype, device=xq.device)
    elif tuple(out.shape) != (B, H, 1, D) or not out.is_contiguous() or out.device != xq.device:
        raise ValueError(f"out must be a contiguous tensor [B, H, 1, D] = {[B, H, 1, D]} on {xq.device}")
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
        eps,
        xq.stride(0),
        xq.stride(1),
        eta.stride(0),
        eta.stride(1),
        D=D,
        MB=b,
        ROWS=min(D, 32),
        POS_FROM_PTR=isinstance(position, Tensor),
        num_warps=_num_warps(D),
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
    """`ops.ttt_linear` through the kernel where it can run, else the reference; same arguments.

    impl: "auto" picks the kernel for CUDA tensors when triton is importable, the shape is
    supported and no gradient is needed; "kernel" and "reference" force one path.
    """
    if impl not in ("auto", "kernel", "reference"):
        raise ValueError(f"impl must be 'auto', 'kernel' or 'reference', got {impl!r}")
    if impl == "auto":
        tensors = (XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, token_idx)
        impl = "kernel" if kernel_applies(XQ, mini_batch_size, tensors) else "reference"
    op = ttt_linear_prefill if impl == "kernel" else ops.ttt_linear
    return op(XQ, XK, XV, eta, W0, b0, ln_weight, ln_bias, mini_batch_size, token_idx, eps)

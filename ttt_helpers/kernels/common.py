"""What the TTT-Linear and TTT-MLP kernel wrappers share: when a kernel can run, the checks of
their arguments (each error names the argument), and the launch settings.

Triton is not imported here: `triton_available` only looks for it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .. import ops

HEAD_DIMS = (16, 32, 64, 128)
MAX_MINI_BATCH = 64
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRAIN_DTYPES = (*INPUT_DTYPES, torch.float64)  # the training path also runs in float64 (exact checks)
PRECISION_16BIT = ("tf32", "bf16")  # tl.dot precisions (W products, gradient products), 16-bit inputs


def triton_available() -> bool:
    """True when triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_kernels(tensor: Tensor) -> bool:
    """True when `tensor` is on a CUDA device and triton is importable: the kernels can run."""
    return tensor.is_cuda and triton_available()


def needs_grad(tensors: tuple[object, ...]) -> bool:
    """True when autograd would track an op on `tensors`: the training kernels must run, not the prefill."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def kernel_applies(XQ: Tensor, mini_batch_size: int) -> bool:
    """The automatic choice: a kernel runs for CUDA inputs of a supported shape and dtype when
    triton is importable (the prefill without gradients, the training kernels with them); the
    reference op everywhere else."""
    supported = (
        XQ.dim() == 4
        and XQ.dtype in INPUT_DTYPES
        and XQ.shape[-1] in HEAD_DIMS
        and 1 <= mini_batch_size <= MAX_MINI_BATCH
    )
    return supported and use_kernels(XQ)


SCHEDULES = ("auto", "fused", "split")  # how the TTT-Linear training kernels split their work


def training_schedule(schedule: str, XQ: Tensor) -> str:
    """The TTT-Linear training schedule for XQ: [B, H, T, D], whose B * H (batch, head) pairs are
    each one sequential chain.

    "split" moves everything that does not depend on the state (or its adjoint) out of the
    sequential loops into kernels parallel over mini-batches, at the cost of writing and reading
    [B * H, T, D] intermediates; "fused" runs forward and backward as one sequential kernel each.
    "auto" picks fused once the chains alone keep half the GPU's SMs busy (B * H >= 66 on an
    H200's 132), where the split's extra memory traffic costs more than its parallelism gains, and
    split below. Measured on an H200 (H = 12, D = 64, bf16, benchmarks/results/backward_h200.json):
    at B * H = 24 split is 2.1x faster; at 96 they tie; at 192 and 384 fused is 1.35x and 1.5x faster.
    The fused backward holds more at once: at D = 128 with 32- or 64-bit inputs it needs 273 KiB of
    shared memory where an H200 has 227 KiB, so there it is refused and auto picks split.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    fits = XQ.shape[-1] < 128 or XQ.element_size() <= 2 or interpreting()
    if schedule == "fused" and not fits:
        raise ValueError(
            f"schedule='fused' does not fit in shared memory at head dim {XQ.shape[-1]} with {XQ.dtype} inputs: "
            "use 'split' (or 'auto', which picks it)"
        )
    if schedule != "auto":
        return schedule
    if not XQ.is_cuda or not fits:
        return "split"
    sms = torch.cuda.get_device_properties(XQ.device).multi_processor_count
    return "fused" if 2 * XQ.shape[0] * XQ.shape[1] >= sms else "split"


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def precisions(dtype: torch.dtype) -> tuple[str, str, str]:
    """tl.dot precisions of xq xk^T, of the products with the state W, of those with the gradients.

    float32 inputs: full float32 products. 16-bit inputs: xq xk^T in their own type (exact), the
    W products in tf32 and the gradient products in bf16 (PRECISION_16BIT). Rounding W to bf16
    lets the error of Z grow with T (past 5e-3 at T = 64k on an H100), tf32 keeps it near the
    output's own bf16 rounding for 10 to 15% more time (benchmarks/README.md). The interpreter's
    tl.dot mishandles 16-bit operands (triton 3.9), so it computes everything in float32.
    float64 inputs (the training kernels' exact checks) multiply in float64.
    """
    if dtype == torch.float64:
        return "fp64", "fp64", "fp64"
    if dtype == torch.float32 or interpreting():
        return "ieee", "ieee", "ieee"
    return ("bf16" if dtype == torch.bfloat16 else "fp16"), *PRECISION_16BIT


def accumulator(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    """The kernels' state and arithmetic dtype (their ACC) for inputs of `dtype`, as a torch and a
    triton dtype: float64 for float64 inputs, float32 for all others. Imports triton: call it at
    a launch, not at import (TRITON_INTERPRET must be set first)."""
    import triton.language as tl

    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def num_warps(D: int) -> int:
    """Warps per program for head dim D."""
    return {16: 2, 32: 2, 64: 4, 128: 8}[D]


def mini_batch_block(mini_batch_size: int) -> int:
    """The power of two >= max(mini_batch_size, 16) that holds a mini-batch (tl.dot needs dims >= 16)."""
    return max(16, 1 << (mini_batch_size - 1).bit_length())


def check_device(tensor: Tensor, name: str) -> None:
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())):
        raise ValueError(
            f"{name} must be on a CUDA device (or on the CPU with TRITON_INTERPRET=1 set before triton "
            f"is imported), got {tensor.device}"
        )
    if not triton_available():
        raise ValueError("the Triton kernels need the triton package: pip install triton")
    if tensor.device.type == "cpu":
        check_interpreter()


def check_interpreter() -> None:
    """Raise unless Triton's interpreter can run the kernels: triton reads TRITON_INTERPRET when it
    defines its own functions (tl.sum, ...) at its first import, so a variable set after that
    import leaves them compiled-only, and the interpreter fails on the first one a kernel calls.
    Imports triton: call it at a launch."""
    import triton.language as tl

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # another layout of triton: nothing to compare against
        return
    standard_sum = getattr(getattr(tl, "standard", None), "sum", None)
    if standard_sum is not None and not isinstance(standard_sum, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported (transformers and torch.compile import it "
            "too), so Triton's interpreter cannot run the kernels: set the variable before triton is first "
            "imported, at the top of the script or in the shell (TRITON_INTERPRET=1 python ...)"
        )


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_tensors(
    expected: dict[str, tuple[object, tuple[int, ...]]],
    device: torch.device,
    dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES,
) -> None:
    """Each entry name: (tensor, shape) must be a tensor of that shape and one of `dtypes` on `device`."""
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            got = f"shape {list(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape {list(shape)}, got {got}")
        if tensor.dtype not in dtypes:
            raise ValueError(f"{name} must be {_dtype_names(dtypes)}, got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on device {device} like XQ, got {tensor.device}")


def same_strides(XQ: Tensor, XK: Tensor, XV: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One set of strides serves the three: copy only if they disagree."""
    if XQ.stride(-1) != 1 or XK.stride() != XQ.stride() or XV.stride() != XQ.stride():
        return XQ.contiguous(), XK.contiguous(), XV.contiguous()
    return XQ, XK, XV


def check_common(
    XQ: Tensor, mini_batch_size: int, name: str = "XQ", dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES
) -> None:
    """Checks shared by all kernels: XQ's rank, dtype (one of `dtypes`), head dim and device; the mini-batch size."""
    if not isinstance(XQ, Tensor) or XQ.dim() != 4:
        got = list(XQ.shape) if isinstance(XQ, Tensor) else type(XQ).__name__
        raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {got}")
    if XQ.dtype not in dtypes:
        raise ValueError(f"{name} must be {_dtype_names(dtypes)}, got {XQ.dtype}")
    if XQ.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim D = {name}.shape[-1] must be one of {HEAD_DIMS}, got {XQ.shape[-1]}")
    b = mini_batch_size
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_MINI_BATCH:
        raise ValueError(f"mini_batch_size must be an int in [1, {MAX_MINI_BATCH}], got {mini_batch_size!r}")
    check_device(XQ, name)


def prepare_prefill(
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    params: dict[str, Tensor],
    param_shapes: Callable[[int, int, int], tuple[tuple[int, ...], ...]],
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Check a prefill's arguments, each error naming the argument.

    params: the initial state by name; param_shapes(B, H, D): their expected shapes; dtypes: those
    every tensor may have (TRAIN_DTYPES for the training kernels, which run in float64 too). Returns
    XQ, XK, XV with one set of strides, token_idx (default 1/(1..b) filled in) and Z, an empty
    output in XQ's dtype and layout (a [B, T, H, D] view stays one).
    """
    check_common(XQ, mini_batch_size, dtypes=dtypes)
    B, H, T, D = XQ.shape
    if T == 0:
        raise ValueError("XQ must hold at least one token (T >= 1), got T = 0")
    if token_idx is None:
        token_idx = ops.default_token_idx(mini_batch_size, device=XQ.device)
    check_tensors(
        {
            "XK": (XK, (B, H, T, D)),
            "XV": (XV, (B, H, T, D)),
            "eta": (eta, (B, H, T)),
            **{name: (p, shape) for (name, p), shape in zip(params.items(), param_shapes(B, H, D))},
            "ln_weight": (ln_weight, (H, D)),
            "ln_bias": (ln_bias, (H, D)),
            "token_idx": (token_idx, (mini_batch_size,)),
        },
        XQ.device,
        dtypes,
    )
    for name, x in (("XK", XK), ("XV", XV)):
        if x.dtype != XQ.dtype:
            raise ValueError(f"{name} must have dtype {XQ.dtype} like XQ, got {x.dtype}")
    if needs_grad((XQ, XK, XV, eta, *params.values(), ln_weight, ln_bias, token_idx)):
        raise ValueError(
            "the Triton prefill has no backward: call it under torch.no_grad(), or train through "
            "kernels.ttt_linear_train / ttt_mlp_train"
        )
    XQ, XK, XV = same_strides(XQ, XK, XV)
    return XQ, XK, XV, token_idx, torch.empty_like(XQ)


def prepare_decode(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    state: tuple[Tensor, ...],
    names: tuple[str, ...],
    state_shapes: Callable[[int, int, int], tuple[tuple[int, ...], ...]],
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_idx: Tensor,
    out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, tuple[Tensor, int, bool, int]]:
    """Check a decode step's arguments, each error naming the argument.

    state: the tensors `names`, updated in place (so contiguous); state_shapes(B, H, D): their
    expected shapes. Returns xq, xk, xv with one set of strides, the output buffer (`out` when
    given), the mini-batch size and the position as (pointer, value, from_pointer, stride): a
    device tensor, one element for all rows (stride 0) or [B] with one per row (stride 1), is
    read in the kernel (no host sync, so a CUDA graph can replay the step; its range is not
    checked); an int is passed by value.
    """
    b = token_idx.shape[0] if isinstance(token_idx, Tensor) and token_idx.dim() == 1 else 0
    check_common(xq, max(b, 1), "xq")
    B, H, one, D = xq.shape
    if one != 1:
        raise ValueError(f"xq must hold one token [B, H, 1, D], got {list(xq.shape)}")
    if not isinstance(state, tuple) or len(state) != len(names):
        raise ValueError(f"state must be a tuple ({', '.join(names)}), got {type(state).__name__}")
    check_tensors(
        {
            "xk": (xk, (B, H, 1, D)),
            "xv": (xv, (B, H, 1, D)),
            "eta": (eta, (B, H)),
            **{f"state[{i}] ({n})": (t, s) for i, (n, t, s) in enumerate(zip(names, state, state_shapes(B, H, D)))},
            "ln_weight": (ln_weight, (H, D)),
            "ln_bias": (ln_bias, (H, D)),
            "token_idx": (token_idx, (b,)),
        },
        xq.device,
    )
    for i, (name, t) in enumerate(zip(names, state)):
        if not t.is_contiguous():
            raise ValueError(f"state[{i}] ({name}) must be contiguous to be updated in place; pass {name}.contiguous()")
    if isinstance(position, Tensor):
        one = position.numel() == 1
        if not (one or tuple(position.shape) == (B,)) or position.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"position must be an int, or an int32 or int64 tensor with one element or one per row [{B}], "
                f"got {position.dtype} {list(position.shape)}"
            )
        if position.device != xq.device or not position.is_contiguous():
            raise ValueError(f"position must be a contiguous tensor on {xq.device}, got one on {position.device}")
        pos = (position, 0, True, 0 if one else 1)
    elif isinstance(position, int) and not isinstance(position, bool) and 0 <= position < b:
        pos = (token_idx, position, False, 0)  # the pointer is unused when the value is given
    else:
        raise ValueError(f"position must be in [0, {b}), got {position!r}")
    xq, xk, xv = same_strides(xq, xk, xv)
    if out is None:
        out = torch.empty((B, H, 1, D), dtype=xq.dtype, device=xq.device)
    elif tuple(out.shape) != (B, H, 1, D) or not out.is_contiguous() or out.device != xq.device:
        raise ValueError(f"out must be a contiguous tensor [B, H, 1, D] = {[B, H, 1, D]} on {xq.device}")
    return xq, xk, xv, out, b, pos

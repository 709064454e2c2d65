"""What the TTT-Linear and TTT-MLP kernel wrappers share: when a kernel can run, the checks of
their arguments (each error names the argument), and the launch settings.

Triton is not imported here: `triton_available` only looks for it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

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
    """
    if dtype == torch.float32 or interpreting():
        return "ieee", "ieee", "ieee"
    return ("bf16" if dtype == torch.bfloat16 else "fp16"), *PRECISION_16BIT


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


def check_tensors(expected: dict[str, tuple[object, tuple[int, ...]]], device: torch.device) -> None:
    """Each entry name: (tensor, shape) must be a floating tensor of that shape on `device`."""
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            got = f"shape {list(tensor.shape)}" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape {list(shape)}, got {got}")
        if tensor.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on device {device} like XQ, got {tensor.device}")


def same_strides(XQ: Tensor, XK: Tensor, XV: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One set of strides serves the three: copy only if they disagree."""
    if XQ.stride(-1) != 1 or XK.stride() != XQ.stride() or XV.stride() != XQ.stride():
        return XQ.contiguous(), XK.contiguous(), XV.contiguous()
    return XQ, XK, XV


def check_common(XQ: Tensor, mini_batch_size: int, name: str = "XQ") -> None:
    """Checks shared by all kernels: XQ's rank, dtype, head dim and device; the mini-batch size."""
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
    check_device(XQ, name)


def check_prefill(XQ: Tensor, XK: Tensor, XV: Tensor, inputs: tuple[Tensor, ...]) -> None:
    """A prefill's last checks: XK and XV in XQ's dtype, and no gradient asked of a forward-only kernel."""
    for name, x in (("XK", XK), ("XV", XV)):
        if x.dtype != XQ.dtype:
            raise ValueError(f"{name} must have dtype {XQ.dtype} like XQ, got {x.dtype}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        raise ValueError("the Triton kernel has no backward: call it under torch.no_grad() or use the ops reference")


def check_decode_state(state: tuple[Tensor, ...], names: tuple[str, ...]) -> None:
    """A decode state is updated in place: every tensor of it must be contiguous."""
    for i, (name, t) in enumerate(zip(names, state)):
        if not t.is_contiguous():
            raise ValueError(f"state[{i}] ({name}) must be contiguous to be updated in place; pass {name}.contiguous()")


def decode_position(position: int | Tensor, mini_batch_size: int, token_idx: Tensor, device: torch.device):
    """(pointer, value, from_pointer) for a decode kernel: a device tensor is read in the kernel (no
    host sync, so a CUDA graph can replay the step), an int is passed by value."""
    if isinstance(position, Tensor):
        if position.numel() != 1 or position.dtype not in (torch.int32, torch.int64) or position.device != device:
            raise ValueError(
                f"position must be an int or a one-element int tensor on {device}, "
                f"got {position.dtype} {list(position.shape)} on {position.device}"
            )
        return position, 0, True
    if isinstance(position, int) and not isinstance(position, bool) and 0 <= position < mini_batch_size:
        return token_idx, position, False  # the pointer is unused when the value is given
    raise ValueError(f"position must be in [0, {mini_batch_size}), got {position!r}")


def decode_output(out: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The output buffer of a decode step: `out` when given (checked), else a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or not out.is_contiguous() or out.device != like.device:
        raise ValueError(f"out must be a contiguous tensor [B, H, 1, D] = {list(shape)} on {like.device}")
    return out

"""What the TTT-Linear and TTT-MLP kernel wrappers share: when a kernel can run, the checks of
their arguments (each error names the argument), and the launch settings.

Triton is not imported here: `triton_available` only looks for it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ..ops.checks import Expected, check_table, shape_table
from ..ops.kinds import Kind, State
from ..ops.mini_batch import default_token_idx

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
    """Whether the kernels can run on XQ: CUDA inputs of a supported shape and dtype, with triton
    importable. `layers.pick_path` reads it to choose a path ("auto")."""
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
    "auto" picks fused once the chains alone keep half the GPU's SMs busy, and split below.
    The fused backward does not fit in shared memory at D = 128 with 32- or 64-bit inputs: there
    "fused" is refused and "auto" picks split (benchmarks/README.md, "Measurements behind kernel
    choices").
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
    W products in tf32 and the gradient products in bf16 (PRECISION_16BIT; why tf32 for W:
    benchmarks/README.md, "Measurements behind kernel choices"). The interpreter's tl.dot
    mishandles 16-bit operands (triton 3.9), so it computes everything in float32.
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


def check_tensors(expected: Expected, device: torch.device, dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES) -> None:
    """Each entry name: (tensor, shape) must be a tensor of that shape and one of `dtypes` on `device`."""
    check_table(expected, device, lambda name, t: None if t.dtype in dtypes else f"be {_dtype_names(dtypes)}")


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
    kind: Kind,
    params: State,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Check a prefill's arguments, each error naming the argument.

    params: the initial state of `kind`, in its order; dtypes: those every tensor may have
    (TRAIN_DTYPES for the training kernels, which run in float64 too). Returns XQ, XK, XV with
    one set of strides, token_idx (default 1/(1..b) filled in) and Z, an empty output in XQ's
    dtype and layout (a [B, T, H, D] view stays one).
    """
    check_common(XQ, mini_batch_size, dtypes=dtypes)
    if XQ.shape[2] == 0:
        raise ValueError("XQ must hold at least one token (T >= 1), got T = 0")
    if token_idx is None:
        token_idx = default_token_idx(mini_batch_size, device=XQ.device)
    state = dict(zip(kind.params, params))
    expected = shape_table(XQ, XK, XV, eta, kind, state, ln_weight, ln_bias, token_idx, mini_batch_size)
    check_tensors(expected, XQ.device, dtypes)
    for name, x in (("XK", XK), ("XV", XV)):
        if x.dtype != XQ.dtype:
            raise ValueError(f"{name} must have dtype {XQ.dtype} like XQ, got {x.dtype}")
    if needs_grad((XQ, XK, XV, eta, *params, ln_weight, ln_bias, token_idx)):
        raise ValueError(
            "the Triton prefill has no backward: call it under torch.no_grad(), or train through "
            "kernels.ttt_linear_train / ttt_mlp_train"
        )
    XQ, XK, XV = same_strides(XQ, XK, XV)
    return XQ, XK, XV, token_idx, torch.empty_like(XQ)


def check_decode(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    kind: Kind,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_idx: Tensor,
    out: Tensor | None,
) -> None:
    """Check a decode step's arguments, each error naming the argument: state = (*params, *grads)
    of `kind`, updated in place (so contiguous); position an int in [0, b) or an int32 or int64
    device tensor with one element or one per row [B] (its values are not read back)."""
    b = token_idx.shape[0] if isinstance(token_idx, Tensor) and token_idx.dim() == 1 else 0
    check_common(xq, max(b, 1), "xq")
    B, H, one, D = xq.shape
    if one != 1:
        raise ValueError(f"xq must hold one token [B, H, 1, D], got {list(xq.shape)}")
    names = kind.stream_names()
    if not isinstance(state, tuple) or len(state) != len(names):
        raise ValueError(f"state must be a tuple ({', '.join(names)}), got {type(state).__name__}")
    labelled = {f"state[{i}] ({n})": t for i, (n, t) in enumerate(zip(names, state))}
    check_tensors(shape_table(xq, xk, xv, eta, kind, labelled, ln_weight, ln_bias, token_idx, b, step=True), xq.device)
    for (label, t), name in zip(labelled.items(), names):
        if not t.is_contiguous():
            raise ValueError(f"{label} must be contiguous to be updated in place; pass {name}.contiguous()")
    if isinstance(position, Tensor):
        one = position.numel() == 1
        if not (one or tuple(position.shape) == (B,)) or position.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"position must be an int, or an int32 or int64 tensor with one element or one per row [{B}], "
                f"got {position.dtype} {list(position.shape)}"
            )
        if position.device != xq.device or not position.is_contiguous():
            raise ValueError(f"position must be a contiguous tensor on {xq.device}, got one on {position.device}")
    elif not (isinstance(position, int) and not isinstance(position, bool) and 0 <= position < b):
        raise ValueError(f"position must be in [0, {b}), got {position!r}")
    if out is not None and (tuple(out.shape) != (B, H, 1, D) or not out.is_contiguous() or out.device != xq.device):
        raise ValueError(f"out must be a contiguous tensor [B, H, 1, D] = {[B, H, 1, D]} on {xq.device}")


def decode_buffers(
    xq: Tensor, xk: Tensor, xv: Tensor, position: int | Tensor, token_idx: Tensor, out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, object]]:
    """What a decode kernel launches with, from checked arguments: xq, xk, xv with one set of
    strides, the output buffer (`out` when given) and the position as keyword arguments of the
    kernel: a device tensor, one element for all rows (pos_stride 0) or [B] with one per row (1),
    is read in the kernel (no host sync, so a CUDA graph can replay the step); an int is passed
    by value."""
    if isinstance(position, Tensor):
        stride = 0 if position.numel() == 1 else 1
        pos = dict(POS=position, pos_value=0, POS_FROM_PTR=True, pos_stride=stride)
    else:  # the pointer is unused when the value is given
        pos = dict(POS=token_idx, pos_value=position, POS_FROM_PTR=False, pos_stride=0)
    xq, xk, xv = same_strides(xq, xk, xv)
    if out is None:
        out = torch.empty(xq.shape, dtype=xq.dtype, device=xq.device)
    return xq, xk, xv, out, pos


def strides(prefix: str, tensor: Tensor, dims: str = "bht") -> dict[str, int]:
    """A kernel's stride arguments for `tensor`, by keyword: strides("sx", XQ) is
    {"sx_b": XQ.stride(0), "sx_h": XQ.stride(1), "sx_t": XQ.stride(2)}."""
    return {f"{prefix}_{d}": s for d, s in zip(dims, tensor.stride())}


def launch_settings(dtype: torch.dtype, D: int, mini_batch_size: int) -> dict[str, object]:
    """The compile-time arguments a prefill or training kernel takes for inputs of `dtype`, head
    dim D and the mini-batch size: tile sizes, tl.dot precisions, ACC and warps."""
    qk, w, grad = precisions(dtype)
    return dict(
        D=D,
        MB=mini_batch_size,
        BLOCK_MB=mini_batch_block(mini_batch_size),
        QK_PRECISION=qk,
        W_PRECISION=w,
        GRAD_PRECISION=grad,
        ACC=accumulator(dtype)[1],
        num_warps=num_warps(D),
    )


def norm_args(ln_weight: Tensor, ln_bias: Tensor, token_idx: Tensor) -> dict[str, Tensor]:
    """The LayerNorm parameters and token_idx as a kernel reads them: LN_W, LN_B, TOKEN_IDX, contiguous."""
    return dict(LN_W=ln_weight.contiguous(), LN_B=ln_bias.contiguous(), TOKEN_IDX=token_idx.contiguous())

"""The one shape table of a TTT op's arguments, and the checks the reference ops and the kernels
build on it; each error names the argument.

Shapes: B batch, H heads, T tokens, D head dim, F the TTT-MLP hidden width, b = mini_batch_size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import checks
from .kinds import Kind, hidden_width
from .mini_batch import default_token_idx

Expected = dict[str, tuple[object, tuple[int, ...]]]  # argument name: (the value, its expected shape)


def describe(x: object) -> str:
    """A value's shape for an error message (its type when it is not a tensor)."""
    return f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def shape_table(
    XQ: Tensor,
    XK: object,
    XV: object,
    eta: object,
    kind: Kind,
    state: dict[str, object],
    ln_weight: object,
    ln_bias: object,
    token_idx: object,
    mini_batch_size: int,
    *,
    step: bool = False,
) -> Expected:
    """Every argument after XQ [B, H, T, D] with its expected shape: XK, XV [B, H, T, D], eta
    [B, H, T], the state tensors (named by `state`'s keys, each the shape of the parameter of
    `kind` at its position in the parameters, repeated for a streamed state's gradient sums),
    ln_weight, ln_bias [H, D] and token_idx [b]. step: a decode step's xk, xv [B, H, 1, D] and
    eta [B, H]."""
    B, H, T, D = XQ.shape
    values = list(state.values())
    shapes = kind.state_shapes(B, H, D, hidden_width(values[0], D))
    shapes = shapes * (len(values) // len(shapes))
    k, v, e = ("xk", "xv", (B, H)) if step else ("XK", "XV", (B, H, T))
    return {
        k: (XK, (B, H, T, D)),
        v: (XV, (B, H, T, D)),
        "eta": (eta, e),
        **{name: (value, shape) for (name, value), shape in zip(state.items(), shapes)},
        "ln_weight": (ln_weight, (H, D)),
        "ln_bias": (ln_bias, (H, D)),
        "token_idx": (token_idx, (mini_batch_size,)),
    }


def check_table(expected: Expected, device: torch.device, dtype_problem: Callable[[str, Tensor], str | None]) -> None:
    """Each entry must be a tensor of its shape, with a dtype that `dtype_problem(name, tensor)`
    accepts (None; else what the dtype must be), on `device`."""
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {describe(tensor)}")
        problem = dtype_problem(name, tensor)
        if problem is not None:
            raise ValueError(f"{name} must {problem}, got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on device {device} like XQ, got {tensor.device}")


def check_inputs(
    kind: Kind,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    state: dict[str, Tensor],
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    eps: float = 1e-6,
) -> Tensor:
    """Raise a ValueError naming the first bad argument of a reference op; return token_idx
    (default filled in). state: the state tensors, keyed by how a message calls them.

    XK, XV and eta share XQ's dtype; the state, ln_weight, ln_bias and token_idx share the state's.
    The two may differ where the inputs are 16-bit and the state float32 (bf16 autocast): the ops
    then compute in the state's dtype."""
    checks.positive("eps", eps)
    if not isinstance(XQ, Tensor) or XQ.dim() != 4:
        raise ValueError(f"XQ must be a 4-D tensor [B, H, T, D], got {describe(XQ)}")
    if XQ.shape[2] == 0:
        raise ValueError("XQ must hold at least one token (T >= 1), got T = 0")
    if not XQ.is_floating_point():
        raise ValueError(f"XQ must be a floating-point tensor, got {XQ.dtype}")
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be an int >= 1, got {mini_batch_size!r}")
    first = next(iter(state.values()))
    dtype = first.dtype if isinstance(first, Tensor) else XQ.dtype  # the state's: what the ops compute in
    if dtype != XQ.dtype and not (XQ.element_size() == 2 and dtype == torch.float32):
        raise ValueError(
            f"{next(iter(state))} must have dtype {XQ.dtype} like XQ, or float32 with 16-bit inputs, got {dtype}"
        )
    if token_idx is None:
        token_idx = default_token_idx(mini_batch_size, dtype=dtype, device=XQ.device)

    def dtype_problem(name: str, tensor: Tensor) -> str | None:
        like, want = ("XQ", XQ.dtype) if name in ("XK", "XV", "eta") else ("the state", dtype)
        return None if tensor.dtype == want else f"have dtype {want} like {like}"

    expected = shape_table(XQ, XK, XV, eta, kind, state, ln_weight, ln_bias, token_idx, mini_batch_size)
    check_table(expected, XQ.device, dtype_problem)
    return token_idx


def check_step(xq: Tensor, state: tuple, position: int | Tensor, token_idx: Tensor, n_state: int) -> None:
    """The light checks of one primal step: the state's length and the position's type and range."""
    if not isinstance(state, (tuple, list)) or len(state) != n_state:
        got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"state must be {n_state} tensors (*params, *grads), got {got}")
    checks.tensor("xq", xq, 4)
    checks.tensor("token_idx", token_idx, 1)
    checks.position("position", position, token_idx.numel(), xq.shape[0])

"""What the checks of the TTT ops share: the relative error against a reference, and random
inputs of `ops.ttt_linear` / `ops.ttt_mlp` at the scales a layer sees.

Shapes: B batch, H heads, T tokens, D head dim, F the TTT-MLP hidden width (4D by default).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import KINDS


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref||, with out taken to ref's dtype (the reference is float64)."""
    return ((out.to(ref.dtype) - ref).norm() / ref.norm()).item()


def random_inputs(
    kind: str,
    B: int,
    H: int,
    T: int,
    D: int,
    gen: torch.Generator,
    *,
    F: int | None = None,
    eta_scale: float | None = None,
    state_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    state_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Random keyword arguments of `ops.ttt_linear` (kind "linear") or `ops.ttt_mlp` ("mlp").

    XQ, XK, XV ~ N(0, 1) [B, H, T, D]; eta ~ U(0, eta_scale) [B, H, T], default 1/D as a layer's
    inner learning rate; the state, weights ~ N(0, 1/fan_in) and biases ~ N(0, 0.1^2), or all
    N(0, state_scale^2); ln_weight ~ 1 + N(0, 0.2^2), ln_bias ~ N(0, 0.2^2) [H, D]. Drawn in
    float64, then rounded to `dtype` (the state to `state_dtype`, default `dtype`) on `device`.
    """
    F = F or 4 * D

    def r(*shape: int, scale: float) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    args = dict(
        XQ=r(B, H, T, D, scale=1.0),
        XK=r(B, H, T, D, scale=1.0),
        XV=r(B, H, T, D, scale=1.0),
        eta=torch.rand(B, H, T, generator=gen, dtype=torch.float64) * (eta_scale or 1 / D),
    )
    state = {}
    for name, shape in zip(KINDS[kind].params, KINDS[kind].head_shapes(D, F)):
        default = shape[0] ** -0.5 if name.startswith("W") else 0.1
        state[name] = r(B, H, *shape, scale=state_scale or default)
    args.update(ln_weight=1 + r(H, D, scale=0.2), ln_bias=r(H, D, scale=0.2))
    out = {k: v.to(dtype).to(device) for k, v in args.items()}
    return out | {k: v.to(state_dtype or dtype).to(device) for k, v in state.items()}

"""The mini-batch of TTT: its default step scales token_idx, its spans in a sequence, and the
scale at a token's position in it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .. import checks


def default_token_idx(mini_batch_size: int, *, dtype=torch.float32, device=None) -> Tensor:
    """Return `1 / (1, 2, ..., b)`: token i of a mini-batch averages the i gradients so far. [b]"""
    checks.integer("mini_batch_size", mini_batch_size, 1)
    return 1.0 / torch.arange(1, mini_batch_size + 1, dtype=dtype, device=device)


def mini_batches(T: int, b: int) -> Iterator[tuple[int, int]]:
    """Yield (start, end) of each mini-batch; the last one may be shorter."""
    for start in range(0, T, b):
        yield start, min(start + b, T)


def step_scale(token_idx: Tensor, position: int | Tensor) -> Tensor:
    """token_idx at the position: a scalar, or [B, 1, 1, 1] for a position per row."""
    scale = token_idx[position]
    return scale if scale.dim() == 0 else scale.view(-1, 1, 1, 1)

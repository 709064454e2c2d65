"""The two kinds of TTT layer, TTT-Linear and TTT-MLP, in one table: each kind's state tensors,
their shapes, its reference forms, its kernels and its default inner learning rate.

The forms (`ttt_helpers.ops.reference`) and the kernels (`ttt_helpers.kernels`) build on this
table, so a kind looks them up by name when asked: `dual`, `step`, `primal`, `kernels()`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

State = tuple[Tensor, ...]  # a kind's state tensors in the order of Kind.params, [B, H, ...] each


@functools.cache
def _function(module: str, name: str) -> Callable:
    """`module.name`, imported on the first call and remembered (the forms and kernels are looked up
    by name because they import this table)."""
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Kind:
    """One kind of inner model. params: the state tensors' names, in order; head_shapes(D, F):
    their shapes per head, [D, D] and [1, D] for TTT-Linear (F unused); default_base_lr: the
    scale of a layer's inner learning rate when none is given."""

    name: str
    params: tuple[str, ...]
    head_shapes: Callable[[int, int], tuple[tuple[int, ...], ...]]
    default_base_lr: float

    def state_shapes(self, B: int, H: int, D: int, F: int) -> tuple[tuple[int, ...], ...]:
        """The shape of each state tensor: [B, H, ...] with the per-head shape."""
        return tuple((B, H, *shape) for shape in self.head_shapes(D, F))

    def stream_names(self) -> tuple[str, ...]:
        """The names of a streamed state (*params, *grads): the parameters, then their gradient sums."""
        return self.params + tuple(f"grad_{name}" for name in self.params)

    @property
    def dual(self) -> Callable[..., State]:
        """The mini-batch dual form over a sequence: `ops.ttt_linear` or `ops.ttt_mlp`."""
        return _function("ttt_helpers.ops.reference", f"ttt_{self.name}")

    @property
    def step(self) -> Callable[..., tuple[Tensor, State]]:
        """One token in the primal form: `ops.ttt_linear_step` or `ops.ttt_mlp_step`."""
        return _function("ttt_helpers.ops.reference", f"ttt_{self.name}_step")

    @property
    def primal(self) -> Callable[..., State]:
        """The primal form over a sequence: `ops.ttt_linear_primal` or `ops.ttt_mlp_primal`."""
        return _function("ttt_helpers.ops.reference", f"ttt_{self.name}_primal")

    def kernels(self) -> tuple[Callable, Callable, Callable]:
        """The Triton prefill, decode step and training op (forward and backward) of this kind."""
        return tuple(
            _function("ttt_helpers.kernels", f"ttt_{self.name}_{part}") for part in ("prefill", "decode", "train")
        )


def hidden_width(W1: object, D: int) -> int:
    """TTT-MLP's hidden width F from W1 [B, H, D, F]; 4D, the convention, when W1 is malformed
    (its shape check then names it)."""
    return W1.shape[-1] if isinstance(W1, Tensor) and W1.dim() == 4 else 4 * D


KINDS = {
    "linear": Kind("linear", ("W0", "b0"), lambda D, F: ((D, D), (1, D)), default_base_lr=1.0),
    "mlp": Kind("mlp", ("W1", "b1", "W2", "b2"), lambda D, F: ((D, F), (1, F), (F, D), (1, D)), default_base_lr=0.1),
}


def lookup(name: str) -> Kind:
    """The kind named "linear" or "mlp"; a ValueError for any other name."""
    if name not in KINDS:
        raise ValueError(f"kind must be 'linear' or 'mlp', got {name!r}")
    return KINDS[name]

"""Launch a kernel with some of its launch keywords (num_warps, num_stages, constexprs) replaced."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType, SimpleNamespace


class _Launch:
    """kernel[grid](...) with some launch keywords replaced."""

    def __init__(self, kernel, **overrides) -> None:
        self.kernel, self.overrides = kernel, overrides

    def __getitem__(self, grid):
        launcher = self.kernel[grid]
        return lambda *args, **kwargs: launcher(*args, **{**kwargs, **self.overrides})


def with_launch(module: ModuleType, name: str, **overrides) -> Callable[[], None]:
    """Make `module`'s next launches of kernel `name` use `overrides`; returns a function that undoes it.
    module: a `ttt_helpers.kernels` wrapper module, which reaches its kernels through `programs()`."""
    real = module.programs

    def programs() -> SimpleNamespace:
        kernels = real()
        return SimpleNamespace(**{**vars(kernels), name: _Launch(getattr(kernels, name), **overrides)})

    module.programs = programs
    return lambda: setattr(module, "programs", real)

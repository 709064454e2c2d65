"""The products of a block that read the same input, run as one matrix product, for inference.

A decode step multiplies a few dozen rows by each weight matrix, and a product that small costs
about the same whatever its width: the step's time goes in the number of products. In every
block of a `TTTForCausalLM` the TTT layer's input feeds four or five products (q, k, v, the inner
learning rate's gate and, in the Mamba backbone, the output gate's g_proj), and the normed input
of the feed-forward block two (SwiGLU's gate and up projections). `FusedProjections` concatenates
each group's weights into one matrix, so a block runs four products instead of eight. The output
of one product is the outputs of the separate ones side by side (then zero columns, up to a
multiple of `ROWS`), each entry the same dot product (cuBLAS may sum it in another order, so
low-precision results can differ in the last bit).

The fused matrices are copies, used only inside `applied()`, which runs under `torch.no_grad()`
(a gradient would reach the copy, not the model's weights). Every `applied()` entry gathers the
projections and copies their weights in again (`sync`), and every forward inside copies them
again if one may have changed (`refresh`: an optimiser step, `load_state_dict`, a new parameter
or module), into the same tensors, so a CUDA graph that reads them stays valid; weights of a new
shape, dtype or device need a new `FusedProjections`. The copies take memory beside the weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

ROWS = 64  # the fused weight is padded with zero rows to a multiple of this: an output width such as
# 2,316 (3 x 768 + 12) is not 16-byte aligned in bf16, and cuBLAS then picks a slower kernel


class FusedProjections:
    """The concatenated input projections of every module of `model` that has
    `input_projections()` and a `fused` attribute (the TTT layers and the SwiGLU blocks).

    model: an `nn.Module`; its weights are read now, on every `applied()` entry (`sync`) and,
    when they may have changed, by every `refresh`.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.groups = self._gather()
        if not self.groups:
            raise ValueError(f"model ({type(model).__name__}) has no module with input projections to fuse")
        self.fused = [self._concatenate(projections) for _, projections in self.groups]
        self._watch()
        self.sources = self._sources()
        self.versions = self._versions()
        self.active = 0  # how many applied() blocks are open

    def _gather(self) -> list[tuple[nn.Module, list[nn.Linear]]]:
        """(module, its input projections) for every module of the model that fuses them, as they are now."""
        return [
            (module, [p for p in module.input_projections() if p is not None])
            for module in self.model.modules()
            if hasattr(module, "input_projections") and hasattr(module, "fused")
        ]

    def _watch(self) -> None:
        """Have any new parameter or submodule, in any module (load_state_dict(assign=True),
        `m.weight = nn.Parameter(...)`, `layer.q_proj = nn.Linear(...)`), set `self.moved[0]`:
        the next `refresh` gathers the projections again. Cheaper than walking the model every step."""
        self.moved = moved = [False]

        def hook(*_) -> None:
            moved[0] = True

        handles = [
            nn.modules.module.register_module_parameter_registration_hook(hook),
            nn.modules.module.register_module_module_registration_hook(hook),
        ]
        weakref.finalize(self, _remove, handles)

    @staticmethod
    def _concatenate(projections: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
        """(weight [N, C], bias [N] or None if no projection has one), N the sum of the widths
        rounded up to a multiple of ROWS (zero rows, a zero bias)."""
        first = projections[0].weight
        pad = -sum(p.out_features for p in projections) % ROWS
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projections] + [first.new_zeros(pad, first.shape[1])])
            if all(p.bias is None for p in projections):
                return weight, None
            biases = [first.new_zeros(p.out_features) if p.bias is None else p.bias for p in projections]
            return weight, torch.cat(biases + [first.new_zeros(pad)])

    def _sources(self) -> list[Tensor]:
        """The parameters that `refresh` reads back, gathered once per `sync` (a module's attribute lookup is slow)."""
        return [t for _, ps in self.groups for p in ps for t in (p.weight, p.bias) if t is not None]

    def _versions(self) -> list[tuple[int, int]]:
        """(in-place version counter, address) of every weight and bias that is fused: one of them
        changes whenever the values may have (an in-place edit, or new tensors as `model.float()`)."""
        return [(t._version, t.data_ptr()) for t in self.sources]

    def refresh(self) -> None:
        """Copy the weights into the fused tensors again (`sync`) if any may have changed since: an
        in-place edit, new tensors, a new parameter or projection module. It costs a few
        microseconds when none has (a CUDA-graph decode step calls it), and cannot see an in-place
        edit through `.data` (no version counter moves): `sync` after one."""
        if self.moved[0] or self._versions() != self.versions:
            self.sync()

    def sync(self) -> None:
        """Gather the model's projections and their current weights again and copy them into the
        fused tensors, which stay the same tensors (a CUDA graph that reads them stays valid)."""
        self.moved[0] = False
        groups = self._gather()
        if len(groups) != len(self.fused) or not all(map(_fits, self.fused, (ps for _, ps in groups))):
            raise ValueError(
                "the model's input projections changed shape, dtype or device since they were fused: "
                "make a new FusedProjections"
            )
        with torch.no_grad():
            for (weight, bias), (_, projections) in zip(self.fused, groups):
                rows = sum(p.out_features for p in projections)  # the zero rows after them stay zero
                torch.cat([p.weight for p in projections], out=weight[:rows])
                if bias is not None:
                    biases = [bias.new_zeros(p.out_features) if p.bias is None else p.bias for p in projections]
                    torch.cat(biases, out=bias[:rows])
        self.groups, self.sources = groups, self._sources()
        self.versions = self._versions()
        if self.active:  # a module that came in since runs fused too
            for (module, _), fused in zip(self.groups, self.fused):
                module.fused = fused

    def _before_forward(self, *_) -> None:
        """The model's forward pre-hook inside `applied()`: a weight changed inside the block is used
        from the next forward on (not while a CUDA graph records: the graph reads the fused tensors)."""
        if not (self.fused[0][0].is_cuda and torch.cuda.is_current_stream_capturing()):
            self.refresh()

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, under `torch.no_grad()`, the modules run their fused products: the weights are
        copied in on entry (`sync`, which sees every change) and again before each forward of the
        model if one may have changed (`refresh`; an edit through `.data` inside the block needs a
        `sync`). Enter it around a loop, not per step: an entry copies every fused weight. A nested
        block leaves the outer one fused."""
        with torch.no_grad():
            self.sync()
        previous = [(module, module.fused) for module, _ in self.groups]
        hook = self.model.register_forward_pre_hook(self._before_forward)
        self.active += 1
        try:
            with torch.no_grad():
                for (module, _), fused in zip(self.groups, self.fused):
                    module.fused = fused
                yield
        finally:
            self.active -= 1
            hook.remove()
            for module, _ in self.groups:
                module.fused = None
            for module, fused in previous:
                module.fused = fused


def _fits(fused: tuple[Tensor, Tensor | None], projections: list[nn.Linear]) -> bool:
    """Whether `projections` fill the fused (weight, bias) as they did when it was made."""
    weight, bias = fused
    rows = sum(p.out_features for p in projections)
    tensors = [t for p in projections for t in (p.weight, p.bias) if t is not None]
    return (
        len(projections) > 0
        and tuple(weight.shape) == (rows + -rows % ROWS, projections[0].in_features)
        and all(p.in_features == weight.shape[1] for p in projections)
        and all((t.dtype, t.device) == (weight.dtype, weight.device) for t in tensors)
        and (bias is None) == all(p.bias is None for p in projections)
    )


def _remove(handles: list) -> None:
    """Remove the global hooks of a `FusedProjections` that is gone."""
    for handle in handles:
        handle.remove()

"""The products of a block that read the same input, run as one matrix product, for inference.

A decode step multiplies a few dozen rows by each weight matrix, and a product that small costs
about the same few microseconds whatever its width: the step's time goes in the number of
products. In every block of a `TTTForCausalLM` the TTT layer's input feeds four or five products
(q, k, v, the inner learning rate's gate and, in the Mamba backbone, the output gate's g_proj),
and the normed input of the feed-forward block two (SwiGLU's gate and up projections).
`FusedProjections` concatenates each group's weights into one matrix, so a block of the 125M
model runs four products instead of eight. The output of one product is the outputs of the
separate ones side by side (then zero columns, up to a multiple of `ROWS`), each entry the same
dot product (cuBLAS may sum it in another order, so low-precision results can differ in the last
bit).

The fused matrices are copies, used only inside `applied()`, which runs under `torch.no_grad()`
(a gradient would reach the copy, not the model's weights). `refresh` copies the weights in again
when one has changed (an optimiser step, `load_state_dict`), into the same tensors, so a
CUDA graph that reads them stays valid; weights of a new dtype or device need a new `FusedProjections`.
The copies take memory: 119 MB for the 125M preset in bf16, beside its 221 MB of weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROWS = 64  # the fused weight is padded with zero rows to a multiple of this: an output width of
# 2,316 (3 x 768 + 12) is not 16-byte aligned in bf16, and cuBLAS then picked a kernel 2x slower
# on an H200 (chapter 6)


def project(
    x: Tensor, projections: Sequence[nn.Linear | None], fused: tuple[Tensor, Tensor | None] | None
) -> tuple[Tensor | None, ...]:
    """Each of `projections` applied to x: [B, T, C] -> [B, T, width] each (None for a None):
    separately, or, with `fused` (a (weight, bias) of `FusedProjections`), as one product whose
    output is split."""
    if fused is None:
        return tuple(None if p is None else p(x) for p in projections)
    widths = [p.out_features for p in projections if p is not None]
    out = F.linear(x, *fused)
    parts = iter(out.split([*widths, out.shape[-1] - sum(widths)], dim=-1))
    return tuple(None if p is None else next(parts) for p in projections)


class FusedProjections:
    """The concatenated input projections of every module of `model` that has
    `input_projections()` and a `fused` attribute (the TTT layers and the SwiGLU blocks).

    model: an `nn.Module`; its weights are read now and by every `refresh`.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.groups: list[tuple[nn.Module, list[nn.Linear]]] = []
        for module in model.modules():
            if hasattr(module, "input_projections") and hasattr(module, "fused"):
                self.groups.append((module, [p for p in module.input_projections() if p is not None]))
        if not self.groups:
            raise ValueError(f"model ({type(model).__name__}) has no module with input projections to fuse")
        self.fused = [self._concatenate(projections) for _, projections in self.groups]
        # the parameters read back by every refresh, gathered once (a module's attribute lookup is slow)
        self.sources = [t for _, ps in self.groups for p in ps for t in (p.weight, p.bias) if t is not None]
        self.versions = self._versions()

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

    def _versions(self) -> list[tuple[int, int]]:
        """(in-place version counter, address) of every weight and bias that is fused: one of them
        changes whenever the values may have (an in-place edit, or new tensors as `model.float()`)."""
        return [(t._version, t.data_ptr()) for t in self.sources]

    def refresh(self) -> None:
        """Copy the weights into the fused tensors again if any may have changed since."""
        versions = self._versions()
        if versions == self.versions:
            return
        new = [self._concatenate(projections) for _, projections in self.groups]
        for (weight, _), (new_weight, _) in zip(self.fused, new):
            if (new_weight.shape, new_weight.dtype, new_weight.device) != (weight.shape, weight.dtype, weight.device):
                raise ValueError(
                    "the model's input projections changed shape, dtype or device since they were fused: "
                    "make a new FusedProjections"
                )
        for (weight, bias), (new_weight, new_bias) in zip(self.fused, new):
            weight.copy_(new_weight)
            if bias is not None:
                bias.copy_(new_bias)
        self.versions = versions

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, under `torch.no_grad()`, the modules run their fused products (refreshed first)."""
        self.refresh()
        try:
            with torch.no_grad():
                for (module, _), fused in zip(self.groups, self.fused):
                    module.fused = fused
                yield
        finally:
            for module, _ in self.groups:
                module.fused = None

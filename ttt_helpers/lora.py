"""Low-rank adapters on the weights of `nn.Linear` modules: train a small delta of a large model.

`add_lora` reparametrizes each chosen weight as W + (alpha / rank) B A, with A [rank, in] drawn at
random and B [out, rank] zeros, so the model starts unchanged and only A and B train (W is frozen).
The module stays an `nn.Linear` (torch's parametrizations), so code that calls it or reads
`.weight` needs no change. `factors` reads the trained A and B, `merge` folds them into plain
weights, and `apply_factors` adds saved factors to a model that never had adapters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import checks


class LowRank(nn.Module):
    """The parametrization W -> W + scale * B @ A of one weight [out, in]."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        bound = 1.0 / in_features**0.5  # as nn.Linear draws its weights: the same scale as the input's
        self.A = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def _targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose qualified name ends with one of `names` (".q_proj", say)."""
    return {
        qualified: module
        for qualified, module in model.named_modules()
        if isinstance(module, nn.Linear) and qualified.endswith(names)
    }


def add_lora(model: nn.Module, names: tuple[str, ...], rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Put a low-rank adapter on the weight of every nn.Linear of `model` whose qualified name ends
    with one of `names` (e.g. ("ttt.q_proj", "ttt.o_proj")); freeze those weights. A is drawn from
    `seed`; the scale is alpha / rank. Returns the qualified names of the adapted modules."""
    checks.module("model", model)
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"names must be a non-empty tuple of module-name endings, got {names!r}")
    checks.integer("rank", rank, 1)
    alpha = checks.positive("alpha", alpha)
    targets = _targets(model, names)
    if not targets:
        raise ValueError(f"names {names} match no nn.Linear of the model")
    adapted = [q for q, m in targets.items() if parametrize.is_parametrized(m, "weight")]
    if adapted:
        raise ValueError(f"modules already carry an adapter: {adapted[:3]}")
    generator = torch.Generator().manual_seed(seed)
    for module in targets.values():
        weight = module.weight
        low_rank = LowRank(weight.shape[0], weight.shape[1], rank, alpha / rank, generator)
        low_rank.to(device=weight.device, dtype=weight.dtype)
        weight.requires_grad_(False)
        parametrize.register_parametrization(module, "weight", low_rank)
    return list(targets)


def _adapters(model: nn.Module) -> dict[str, LowRank]:
    return {
        qualified: module.parametrizations.weight[0]
        for qualified, module in model.named_modules()
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight")
    }


def factors(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' factors as {"<module>.lora_A": [rank, in], "<module>.lora_B": [out, rank]}."""
    out = {}
    for qualified, low_rank in _adapters(model).items():
        out[f"{qualified}.lora_A"], out[f"{qualified}.lora_B"] = low_rank.A.detach(), low_rank.B.detach()
    return out


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (W + scale B A, in W's dtype) and remove it, in place."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@torch.no_grad()
def apply_factors(model: nn.Module, tensors: dict[str, Tensor], scale: float) -> list[str]:
    """Add scale * B A to the weight of each module that `tensors` (as from `factors`) names, in
    place, computed in float64 and rounded once to the weight's dtype. Returns the modules changed."""
    checks.module("model", model)
    scale = checks.real("scale", scale)
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith((".lora_A", ".lora_B"))})
    for qualified in names:
        module = modules.get(qualified)
        A, B = tensors.get(f"{qualified}.lora_A"), tensors.get(f"{qualified}.lora_B")
        if not isinstance(module, nn.Linear) or A is None or B is None:
            raise ValueError(f"tensors name an adapter for {qualified!r}, which is not an nn.Linear with both factors")
        weight = module.weight
        if B.shape[0] != weight.shape[0] or A.shape[1] != weight.shape[1] or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{qualified}: factors B {list(B.shape)} and A {list(A.shape)} do not fit the weight {list(weight.shape)}"
            )
        delta = scale * (B.double() @ A.double())
        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
    return names

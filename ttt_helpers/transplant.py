"""Transplanting TTT layers into a pretrained Llama-style model.

The self-attention of chosen decoder layers is replaced by a TTT-Linear layer whose query,
key, value and output projections start from the attention's own weights; the new layers are
then trained to imitate the outputs of the attention they replace, with the rest frozen.
The transplanted layers read full sequences only (no KV cache): evaluate with `use_cache=False`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import checks
from .compat import CACHE_KEY, take_cache
from .layers import TTTLinear


class TTTAsAttention(nn.Module):
    """A TTT layer standing where the self-attention of decoder layer `layer_idx` stood.

    Reads whole sequences only. When the model passes a KV cache, the layer records its tokens
    there as one key and value of width 1 (T numbers), so the model's count of positions stays right, and it
    refuses to continue a cached sequence.
    """

    def __init__(self, ttt: TTTLinear, layer_idx: int) -> None:
        super().__init__()
        self.ttt, self.layer_idx = ttt, layer_idx

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        cache = take_cache(kwargs)  # `cache` from transformers 5.24 on, `past_key_values` before
        if cache is not None:
            if cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError(
                    f"{CACHE_KEY}: a transplanted TTT layer cannot continue a cached sequence; "
                    "decode with use_cache=False"
                )
            B, T, _ = hidden_states.shape
            marker = hidden_states.new_zeros(B, 1, T, 1)
            cache.update(marker, marker, self.layer_idx)
        y, _ = self.ttt(hidden_states)
        return y, None


def ttt_from_attention(
    attn: nn.Module,
    *,
    init: str = "attention",
    mini_batch_size: int = 16,
    seed: int = 0,
    rope_theta: float = 10000.0,
) -> TTTLinear:
    """A TTT-Linear layer shaped like a Llama attention module `attn`.

    init="attention" copies q_proj and o_proj and repeats each grouped key/value head for the
    query heads that share it; init="random" keeps the layer's own random initialisation. The
    layer's other parameters (W0, the learning-rate gate) are drawn from `seed`; `rope_theta` is
    the base of its rotary embedding inside the mini-batch.
    """
    if init not in ("attention", "random"):
        raise ValueError(f"init must be 'attention' or 'random', got {init!r}")
    checks.module("attn", attn)
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        raise ValueError("attn must be a Llama-style attention module (q_proj, k_proj, v_proj, o_proj, head_dim)")
    checks.integer("mini_batch_size", mini_batch_size, 1)
    checks.integer("seed", seed)
    C, D = attn.q_proj.in_features, attn.head_dim
    H, kv_heads = attn.q_proj.out_features // D, attn.k_proj.out_features // D
    torch.manual_seed(seed)
    layer = TTTLinear(C, H, mini_batch_size=mini_batch_size, rope_theta=rope_theta)
    if init == "attention":
        with torch.no_grad():
            layer.q_proj.weight.copy_(attn.q_proj.weight)
            layer.o_proj.weight.copy_(attn.o_proj.weight)
            for mine, theirs in ((layer.k_proj, attn.k_proj), (layer.v_proj, attn.v_proj)):
                per_head = theirs.weight.view(kv_heads, D, C).repeat_interleave(H // kv_heads, dim=0)
                mine.weight.copy_(per_head.reshape(H * D, C))
    return layer.to(attn.q_proj.weight.dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-style causal LM (model.layers[i].self_attn); raises for another model."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError("model must be a Llama-style causal LM with model.layers[i].self_attn")
    return layers


def _check_indices(model: nn.Module, layer_indices: Sequence[int]) -> nn.ModuleList:
    layers = decoder_layers(model)
    if not isinstance(layer_indices, (list, tuple, range)):
        raise TypeError(f"layer_indices must be a list of ints, got {type(layer_indices).__name__}")
    bad = [i for i in layer_indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(layers)]
    if not layer_indices or bad:
        raise ValueError(f"layer_indices must be non-empty indices in [0, {len(layers)}), got {list(layer_indices)}")
    return layers


@torch.no_grad()
def record_attention(
    model: nn.Module, layer_indices: Sequence[int], input_ids: Tensor
) -> dict[int, tuple[Tensor, Tensor]]:
    """Inputs and outputs of the chosen self-attention modules on `input_ids` [B, T].

    Returns {layer index: (hidden states entering attention [B, T, C], attention output [B, T, C])}.
    """
    layers = _check_indices(model, layer_indices)
    checks.token_ids("input_ids", input_ids, checks.model_vocab_size(model), dims=2)
    records, hooks = {}, []
    for i in layer_indices:

        def hook(module, args, kwargs, output, i=i):
            records[i] = (kwargs.get("hidden_states", args[0] if args else None).detach(), output[0].detach())

        hooks.append(layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        model(input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return records


@torch.no_grad()
def match_scale(layer: TTTLinear, inputs: Tensor, targets: Tensor) -> float:
    """Rescale the output norm's weight so layer(inputs) has the targets' root-mean-square; returns the factor."""
    _check_pairs(layer, inputs, targets)
    factor = (targets.pow(2).mean() / layer(inputs)[0].pow(2).mean()).sqrt().item()
    layer.post_norm.weight.mul_(factor)
    return factor


def _check_pairs(layer: TTTLinear, inputs: Tensor, targets: Tensor) -> None:
    checks.module("layer", layer)
    checks.tensor("inputs", inputs, 3)
    checks.tensor("targets", targets, 3)
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {list(inputs.shape)}, got {list(targets.shape)}")
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(f"inputs must hold at least one row and one token, got shape {list(inputs.shape)}")


def imitate(
    layer: TTTLinear,
    inputs: Tensor,
    targets: Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
) -> list[float]:
    """Train `layer` so that layer(inputs) matches targets; returns the loss of every step.

    inputs, targets: [N, T, C], sampled `batch_size` rows at a time with AdamW. The loss is the
    mean squared error relative to the targets' mean square (1.0 = as bad as predicting zero).
    """
    _check_pairs(layer, inputs, targets)
    checks.integer("steps", steps, 1)
    checks.positive("lr", lr)
    checks.integer("batch_size", batch_size, 1)
    checks.integer("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    scale = targets.pow(2).mean()
    losses = []
    layer.train()
    for _ in range(steps):
        rows = torch.randint(0, inputs.shape[0], (batch_size,), generator=generator)
        loss = (layer(inputs[rows])[0] - targets[rows]).pow(2).mean() / scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    layer.eval()
    return losses


def transplant(model: nn.Module, layers: dict[int, TTTLinear]) -> dict[int, nn.Module]:
    """Put each TTT layer in place of the self-attention of decoder layer i, in place.

    Returns the attention modules taken out, so `transplant(model, removed)` restores them.
    """
    if not isinstance(layers, dict) or not all(isinstance(v, nn.Module) for v in layers.values()):
        raise TypeError("layers must be a dict {decoder layer index: TTTLinear (or the attention to restore)}")
    decoder = _check_indices(model, list(layers))
    removed = {}
    for i, layer in layers.items():
        removed[i] = decoder[i].self_attn
        decoder[i].self_attn = TTTAsAttention(layer, i) if isinstance(layer, TTTLinear) else layer
    return removed

"""The next-token loss without the logits: a linear cross-entropy over chunks of tokens.

A language model's head turns N hidden states [N, C] into logits [N, V]; with SmolLM2's vocabulary
(V = 49152) the logits of 16k tokens take 3 GiB in float32, and their gradient as much again, more
than the rest of a small model's activations. `linear_cross_entropy` computes the same mean loss
chunk by chunk and, when gradients are wanted, the gradients of the hidden states and of the head
in the same pass, so no more than one chunk of logits [chunk, V] ever exists.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import checks

CHUNK = 4096  # tokens per chunk: [4096, 49152] float32 logits are 0.75 GiB


def _chunked(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int, grads: tuple[bool, bool]
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean loss and, as `grads` asks, its gradients with respect to hidden and weight, chunk by chunk."""
    exact = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64
    valid = targets != ignore_index
    count = valid.sum().to(exact)
    total = torch.zeros((), dtype=exact, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grads[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if grads[1] else None
    w = weight.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk):
        h, keep = hidden[start : start + chunk], valid[start : start + chunk]
        target = torch.where(keep, targets[start : start + chunk], 0)
        logits = (h @ w.T).to(exact)
        log_z = torch.logsumexp(logits, dim=-1)
        total += torch.where(keep, log_z - logits.gather(1, target[:, None]).squeeze(1), 0).sum()
        if any(grads):
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count, 0 on ignored rows
            grad = torch.exp(logits - log_z[:, None])
            grad[torch.arange(h.shape[0], device=h.device), target] -= 1
            grad = (grad * (keep[:, None].to(exact) / count)).to(h.dtype)
            if grads[0]:
                grad_hidden[start : start + chunk] = grad @ w
            if grads[1]:
                grad_weight += (grad.T @ h).to(exact)
    return total / count, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int) -> Tensor:
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, chunk, ignore_index, tuple(ctx.needs_input_grad[:2])
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk: int = CHUNK, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T against targets, over the targets that
    are not ignore_index, as `F.cross_entropy(hidden @ weight.T, targets)` gives it, without the
    logits: hidden [N, C], weight [V, C] (a head without bias), targets [N] -> a scalar in float32
    (float64 for float64 hidden states).

    The products run in hidden's dtype (the head's weight is cast to it, as autocast would), the
    log-softmax in float32. Its gradients are computed in the forward pass, chunk by chunk, and
    kept: [N, C] and [V, C], the size of the inputs.
    """
    checks.tensor("hidden", hidden, 2)
    checks.tensor("weight", weight, 2)
    checks.integer("chunk", chunk, 1)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}] like hidden's width, got {list(weight.shape)}")
    if not isinstance(targets, Tensor) or targets.dtype != torch.long or tuple(targets.shape) != (hidden.shape[0],):
        got = f"{targets.dtype} {list(targets.shape)}" if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an int64 tensor [{hidden.shape[0]}], got {got}")
    if hidden.device != weight.device or hidden.device != targets.device:
        devices = f"{hidden.device}, {weight.device}, {targets.device}"
        raise ValueError(f"hidden, weight and targets must be on one device, got {devices}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index)
    return _chunked(hidden, weight, targets, chunk, ignore_index, (False, False))[0]


def causal_lm_loss(model: nn.Module, input_ids: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """The mean next-token loss of a causal LM on input_ids [B, T] (token t + 1 predicted from
    tokens up to t), through `linear_cross_entropy`: the model runs up to its final norm
    (`final_hidden`) and its head is applied chunk by chunk. Any model whose head is a Linear
    without bias: ours, transformers' Llama, fla's models."""
    checks.token_ids("input_ids", input_ids, checks.model_vocab_size(model), dims=2)
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least two tokens per row, got shape {list(input_ids.shape)}")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError("model's head must be a Linear without bias (get_output_embeddings())")
    hidden = final_hidden(model, input_ids[:, :-1])
    return linear_cross_entropy(hidden.flatten(0, 1), head.weight, input_ids[:, 1:].flatten(), chunk=chunk)


def final_hidden(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The hidden states [B, T, C] a causal LM's head reads: ours through `TTTModel` without a
    cache, a transformers-style model through its decoder (`model.model`, last_hidden_state)."""
    from ..model import TTTForCausalLM

    if isinstance(model, TTTForCausalLM):
        return model.model(model.model.embed_tokens(input_ids), None)
    out = model.model(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

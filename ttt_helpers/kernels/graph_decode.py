"""Whole-model decode steps of a `TTTForCausalLM`, replayed from CUDA graphs.

A decode step of the model launches a few hundred small kernels; at batch 64 on a large GPU
launching them from Python takes longer than running them. Capturing the step once and
replaying it removes that cost. The TTT state is updated in place by the decode kernel, so a
captured step keeps working on the live cache. The step differs with the token's position in
its inner mini-batch (the last position commits the state), so one graph is captured per
position and the graph of the current position is replayed. The convolution states of the Mamba
backbone are new tensors after each step; the captured step copies them back into the cache's
own tensors, so a replay reads and writes the same memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def capture_step(step: Callable[[], Tensor], mutated: Sequence[Tensor]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Record `step` in a CUDA graph. It runs once first on a side stream (compiling its kernels);
    the `mutated` tensors it changes in place are then put back, so the recording starts from the
    same state. Returns the graph and the output tensor that every replay rewrites."""
    saved = [t.clone() for t in mutated]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for t, copy in zip(mutated, saved):
        t.copy_(copy)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph, output


def check_graph_model(model: nn.Module) -> torch.device:
    """Raise unless `model` is a TTTForCausalLM that CUDA graphs can capture; returns its device."""
    if getattr(getattr(model, "config", None), "model_type", None) != "ttt":
        raise ValueError(f"model must be a TTTForCausalLM, got {type(model).__name__}")
    if model.config.ttt_impl == "reference":
        raise ValueError("ttt_impl='reference' runs no kernels: use 'auto' or 'kernel'")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
    if model.training:
        raise ValueError("model must be in eval mode (model.eval())")
    return device


class CUDAGraphDecoder:
    """Decode one token per sequence at a time, from CUDA graphs. Greedy or teacher-forced:
    `step(tokens)` returns the logits, the caller picks the next tokens.

    model: a `TTTForCausalLM` (TTT-Linear or TTT-MLP layers, either backbone), on CUDA, in eval mode, with `ttt_impl` "auto" or "kernel"; cache: its `TTTCache` after a prefill
    (`compat.output_cache(model(prompt, use_cache=True))`), updated in place by every step.
    """

    def __init__(self, model: nn.Module, cache) -> None:
        if getattr(cache, "starts", None) is not None:
            raise ValueError(
                "cache: a left-padded batch decodes through the model's forward (its rows run in groups that "
                "change from step to step); CUDAGraphDecoder needs every row at the same position"
            )
        device = check_graph_model(model)
        self.model, self.cache = model, cache
        self.mini_batch_size = model.config.mini_batch_size
        cache.states = [tuple(t.contiguous() for t in s) for s in cache.states]  # updated in place from now on
        cache.conv_states = [None if c is None else c.contiguous() for c in cache.conv_states]
        batch = cache.states[0][0].shape[0]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, Tensor] = {}

    def _live(self) -> list[Tensor]:
        """Every tensor of the cache, in a fixed order."""
        cache = self.cache
        return [t for s in cache.states for t in s] + [c for c in cache.conv_states if c is not None]

    def _forward(self) -> Tensor:
        """One step; tensors the model replaced (convolution states) are copied back into the old ones."""
        cache = self.cache
        states, convs = list(cache.states), list(cache.conv_states)
        before = self._live()
        logits = self.model(self.tokens, cache=cache, use_cache=True).logits  # [B, 1, V]
        for old, new in zip(before, self._live()):
            if new is not old:
                old.copy_(new)
        cache.states, cache.conv_states = states, convs
        return logits

    @torch.no_grad()
    def _capture(self, position: int) -> None:
        """Capture the step at `position`, leaving the cache as it was."""
        cache, seen = self.cache, self.cache.seen_tokens
        at_position = seen - seen % self.mini_batch_size + position

        def step() -> Tensor:
            cache.seen_tokens = at_position  # the model reads the position from it, and advances it
            return self._forward()

        self.graphs[position], self.logits[position] = capture_step(step, self._live())
        cache.seen_tokens = seen

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens: [B, 1] (or [B]) int64 on the model's device -> logits [B, 1, V], valid until
        the next step at the same mini-batch position."""
        position = self.cache.seen_tokens % self.mini_batch_size
        if position not in self.graphs:
            self._capture(position)
        self.tokens.copy_(tokens.view(-1, 1))
        self.graphs[position].replay()
        self.cache.seen_tokens += 1
        return self.logits[position]

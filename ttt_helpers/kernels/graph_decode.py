"""Whole-model decode steps of a `TTTForCausalLM`, replayed from a CUDA graph.

A decode step of the model launches a few hundred small kernels; at batch 64 on a large GPU
launching them from Python takes longer than running them. Capturing the step once and
replaying it removes that cost. The TTT state is updated in place by the decode kernel, so a
captured step keeps working on the live cache. Each row's position in its inner mini-batch (the
last position commits the state) is read on the device from the cache's `positions`, and every
replay advances it there, so one graph serves every step, and the rows of a left-padded batch,
each at its own position, decode together. The convolution states of the Mamba backbone are new
tensors after each step; the captured step copies them back into the cache's own tensors, so a
replay reads and writes the same memory. The graph runs each block's input projections as one
product (`FusedProjections`), whose fused weights every step copies in again if the model's may
have changed (an in-place edit, a new parameter or module; an edit through `.data` moves no
version counter: call `decoder.fused.sync()` after one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .. import checks
from ..fused_projections import FusedProjections


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
    """Decode one token per sequence at a time, from a CUDA graph. Greedy or teacher-forced:
    `step(tokens)` returns the logits, the caller picks the next tokens.

    model: a `TTTForCausalLM` (TTT-Linear or TTT-MLP layers, either backbone), on CUDA, in eval
    mode, with `ttt_impl` "auto" or "kernel"; cache: its `TTTCache` after a prefill
    (`compat.output_cache(model(prompt, use_cache=True))`, left-padded prompts included),
    updated in place by every step. The model may also be called on the cache between steps
    (a longer continuation, say): the next step first copies what that call replaced back into
    the tensors the graph reads. fuse: run each block's products that read one input as one
    (`FusedProjections`, which keeps a copy of those weights; False: the model's products as
    they are).
    """

    def __init__(self, model: nn.Module, cache, fuse: bool = True) -> None:
        device = check_graph_model(model)
        checks.boolean("fuse", fuse)
        self.model, self.cache = model, cache
        model.model.check_cache(cache, cache.states[0][0].shape[0])
        cache.states = [tuple(t.contiguous() for t in s) for s in cache.states]  # updated in place from now on
        cache.conv_states = [None if c is None else c.contiguous() for c in cache.conv_states]
        cache.keep_positions(model.config.mini_batch_size)  # read and advanced on the device by every replay
        self.tokens = torch.zeros(cache.positions.shape[0], 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.states, self.conv_states = list(cache.states), list(cache.conv_states)  # what the graph reads
        self.tensors = self._live()
        self.seen = cache.seen_tokens  # where the decoder left the cache: a model call since moves it
        self.fused = FusedProjections(model) if fuse else None

    def _live(self) -> list[Tensor]:
        """Every tensor of the cache as it is now, in a fixed order."""
        cache = self.cache
        convs = [c for c in cache.conv_states if c is not None]
        return [t for s in cache.states for t in s] + convs + [cache.positions]

    def _restore(self) -> None:
        """Point the cache back at the tensors the graph reads, copying in any that a model call replaced."""
        for old, new in zip(self.tensors, self._live()):
            if new is not old:
                old.copy_(new)
        cache = self.cache
        cache.states, cache.conv_states, cache.positions = list(self.states), list(self.conv_states), self.tensors[-1]

    def _forward(self) -> Tensor:
        """One step; tensors the model replaced (convolution states) are copied back into the old ones."""
        logits = self.model(self.tokens, cache=self.cache, use_cache=True).logits  # [B, 1, V]
        self._restore()
        return logits

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens: [B, 1] (or [B]) int64 on the model's device -> logits [B, 1, V], valid until
        the next step."""
        cache = self.cache
        if cache.seen_tokens != self.seen:  # the model read tokens of the cache outside the decoder
            self._restore()
        if self.graph is None:
            seen = cache.seen_tokens
            with nullcontext() if self.fused is None else self.fused.applied():
                self.graph, self.logits = capture_step(self._forward, self.tensors)
            cache.seen_tokens = seen  # the warm-up and the recording each counted a token
        elif self.fused is not None:
            self.fused.refresh()
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        cache.seen_tokens += 1
        self.seen = cache.seen_tokens
        return self.logits

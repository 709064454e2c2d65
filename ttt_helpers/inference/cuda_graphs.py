"""A `TTTForCausalLM`'s decode steps and prefills replayed from CUDA graphs.

A decode step of the model launches a few hundred small kernels, and a prefill of a short
prompt spends more time in Python and kernel launches than in its kernels. Capturing the work
once and replaying it leaves only the kernels.

`CUDAGraphDecoder`: the TTT state is updated in place by the decode kernel, so a captured step
keeps working on the live cache. Each row's position in its inner mini-batch (the last position
commits the state) is read on the device from the cache's `positions`, and every replay advances
it there, so one graph serves every step, and the rows of a left-padded batch, each at its own
position, decode together. Hybrid layers (`TTTConfig.attention_window`) read the token count on
the device too (`TTTCache.tokens`), for their attention's rotary positions and masks. The convolution states of the Mamba backbone are new tensors after
each step; the captured step copies them back into the cache's own tensors, so a replay reads
and writes the same memory. The graph runs each block's input projections as one product
(`FusedProjections`), whose fused weights every step copies in again if the model's may have
changed (an in-place edit, a new parameter or module; an edit through `.data` moves no version
counter: call `decoder.fused.sync()` after one).

`CUDAGraphPrefill`: one graph per prompt shape [B, T]. A graph keeps the memory of its forward's
tensors for as long as it lives: delete the prefill object to free it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import checks
from ..compat import output_cache
from ..kernels.cuda_graph import capture_step
from ..model import TTTCache, TTTForCausalLM
from .fused_projections import FusedProjections


def check_graph_model(model: nn.Module) -> torch.device:
    """Raise unless `model` is a TTTForCausalLM that CUDA graphs can capture; returns its device."""
    if not isinstance(model, TTTForCausalLM):
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

    def __init__(self, model: nn.Module, cache: TTTCache, fuse: bool = True) -> None:
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
        return self.cache.tensors() + [self.cache.positions, self.cache.tokens]

    def _restore(self) -> None:
        """Point the cache back at the tensors the graph reads, copying in any that a model call replaced."""
        for old, new in zip(self.tensors, self._live()):
            if new is not old:
                old.copy_(new)
        cache = self.cache
        cache.states, cache.conv_states = list(self.states), list(self.conv_states)
        cache.positions, cache.tokens = self.tensors[-2:]

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


@dataclass
class _Captured:
    """One prompt shape's graph, its input buffer and the outputs every replay rewrites."""

    graph: torch.cuda.CUDAGraph
    ids: Tensor  # [B, T]
    logits: Tensor  # [B, 1, V]
    cache: TTTCache | None  # the cache the captured forward returned


class CUDAGraphPrefill:
    """`prefill(input_ids)` -> (logits of the last token [B, 1, V], a TTTCache or None): the
    forward replayed from the CUDA graph of the prompt's shape, captured (after one untimed run)
    the first time that shape is seen.

    model: a `TTTForCausalLM` on CUDA in eval mode, `ttt_impl` "auto" or "kernel". The logits and
    the cache returned are copies that later replays leave alone; the cache continues the
    sequence as the one `model(input_ids, use_cache=True)` returns would (`CUDAGraphDecoder`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.device = check_graph_model(model)
        self.model = model
        self.captured: dict[tuple[int, int, bool], _Captured] = {}

    def _capture(self, B: int, T: int, use_cache: bool) -> _Captured:
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        outputs = {}

        def forward() -> Tensor:
            out = self.model(ids, use_cache=use_cache, logits_to_keep=1)
            outputs["cache"] = output_cache(out)
            return out.logits

        graph, logits = capture_step(forward, [])
        return _Captured(graph, ids, logits, outputs["cache"])

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, use_cache: bool = True) -> tuple[Tensor, TTTCache | None]:
        checks.token_ids("input_ids", input_ids, self.model.config.vocab_size, dims=2)
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on the model's device {self.device}, got {input_ids.device}")
        key = (*input_ids.shape, bool(use_cache))
        if key not in self.captured:
            self.captured[key] = self._capture(*key)
        run = self.captured[key]
        run.ids.copy_(input_ids)
        run.graph.replay()
        return run.logits.clone(), None if run.cache is None else run.cache.clone()

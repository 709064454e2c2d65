"""A `TTTForCausalLM`'s prefill replayed from CUDA graphs, one per prompt shape.

At batch 1 and a few thousand tokens, a model's forward spends more time in Python and kernel
launches than in its kernels. Capturing the forward once per prompt shape [B, T] and replaying
it leaves only the kernels: the prefill takes the sum of their times. A graph keeps the memory
of its forward's tensors for as long as it lives: delete the prefill object to free it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import token_ids
from ..compat import output_cache
from .graph_decode import capture_step, check_graph_model


@dataclass
class _Captured:
    """One prompt shape's graph, its input buffer and the outputs every replay rewrites."""

    graph: torch.cuda.CUDAGraph
    ids: Tensor  # [B, T]
    logits: Tensor  # [B, 1, V]
    cache: object  # the TTTCache the captured forward returned, or None


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
    def __call__(self, input_ids: Tensor, use_cache: bool = True) -> tuple[Tensor, object]:
        token_ids("input_ids", input_ids, self.model.config.vocab_size, dims=2)
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on the model's device {self.device}, got {input_ids.device}")
        key = (*input_ids.shape, bool(use_cache))
        if key not in self.captured:
            self.captured[key] = self._capture(*key)
        run = self.captured[key]
        run.ids.copy_(input_ids)
        run.graph.replay()
        cache = run.cache
        if cache is not None:
            cache = type(cache)(
                [tuple(t.clone() for t in s) for s in cache.states],
                [None if c is None else c.clone() for c in cache.conv_states],
                cache.seen_tokens,
            )
        return run.logits.clone(), cache

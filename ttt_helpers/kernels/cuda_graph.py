"""Recording a step in a CUDA graph, so that every replay launches all its kernels at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


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

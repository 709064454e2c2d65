"""Triton kernels for the TTT ops; `ttt_helpers.ops` is their reference, one import away.

TTT-Linear has two kernels (`ttt_linear.py`): a fused prefill, one program per (batch, head)
keeping the D x D float32 state in registers over the whole sequence (16 KB for D = 64), and a
decode step that updates the state in place, replayable from a CUDA graph (`TTTLinearDecoder`).
`CUDAGraphDecoder` replays a whole model's decode step from CUDA graphs.
`ttt_linear_auto` picks the kernel on CUDA and the reference elsewhere; `TTTLinear` layers
(and so `TTTForCausalLM`, through `TTTConfig.ttt_impl`) make the same choice.

TTT-MLP has no kernel here. Its state per head is W1 [D, 4D], W2 [4D, D] and their gradient
sums, 8 D^2 floats: 128 KB in float32 for D = 64, against 64 K 32-bit registers (256 KB) per
H100 multiprocessor shared by all its threads, and 228 KB of shared memory. One program could
not keep that in registers; a kernel would hold W1 and W2 in shared memory and stream tiles of
them through the matrix units for every product of a mini-batch (x W1, the gradient through W2,
both updates), trading the simple register-resident loop for tiled loads and barriers. That
is left undone: TTT-MLP layers always run `ops.ttt_mlp`.
"""

from .graph_decode import CUDAGraphDecoder
from .ttt_linear import (
    HEAD_DIMS,
    MAX_MINI_BATCH,
    TTTLinearDecoder,
    kernel_applies,
    needs_grad,
    triton_available,
    ttt_linear_auto,
    ttt_linear_decode,
    ttt_linear_prefill,
    use_kernels,
)

__all__ = [
    "CUDAGraphDecoder",
    "HEAD_DIMS",
    "MAX_MINI_BATCH",
    "TTTLinearDecoder",
    "kernel_applies",
    "needs_grad",
    "triton_available",
    "ttt_linear_auto",
    "ttt_linear_decode",
    "ttt_linear_prefill",
    "use_kernels",
]

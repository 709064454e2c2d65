"""Triton kernels for the TTT ops; `ttt_helpers.ops` is their reference, one import away.

Each layer kind has a fused prefill (the mini-batch dual form, one program per (batch, head)
walking every mini-batch in order) and a decode step (the primal form, updating the state in
place, so it can be replayed from a CUDA graph):

- TTT-Linear (`ttt_linear.py`): the D x D float32 state stays in registers over the whole
  sequence (16 KB for D = 64).
- TTT-MLP (`ttt_mlp.py`): the state, W1 [D, 4D] and W2 [4D, D] plus their gradient sums in the
  decode step, is 8 D^2 floats, 128 KB in float32 for D = 64. An H100 multiprocessor has 256 KB
  of registers for all its threads and 228 KB of shared memory, so one program cannot hold it:
  the kernels keep W1 and W2 in global memory (in the L2 cache at a model's sizes) and stream
  them through registers 32 columns of the hidden width at a time, twice per mini-batch.

Training runs through `ttt_linear_train` and `ttt_mlp_train`, autograd Functions whose forward
saves the state at the start of every mini-batch and whose backward carries the state's adjoint
through the mini-batches in reverse. TTT-Linear has two schedules: with few (batch, head)
chains everything but the adjoint's recurrence runs in kernels parallel over mini-batches
("split"); once the chains fill half the GPU, one sequential kernel each way does it all
("fused"); `schedule="auto"` picks. The layers (`ttt_helpers.layers`, and so `TTTForCausalLM`
through `TTTConfig.ttt_impl`) choose between the kernels and the reference.
`TTTLinearDecoder` replays the decode step of one TTT-Linear op from a CUDA graph (a whole model's
decode step and prefill: `ttt_helpers.inference.cuda_graphs`).
"""

from .common import HEAD_DIMS, MAX_MINI_BATCH, kernel_applies, needs_grad, triton_available, use_kernels
from .ttt_linear import (
    TTTLinearDecoder,
    TTTLinearFunction,
    ttt_linear_decode,
    ttt_linear_prefill,
    ttt_linear_train,
)
from .ttt_mlp import TTTMLPFunction, ttt_mlp_decode, ttt_mlp_prefill, ttt_mlp_train

__all__ = [
    "HEAD_DIMS",
    "MAX_MINI_BATCH",
    "TTTLinearDecoder",
    "TTTLinearFunction",
    "TTTMLPFunction",
    "kernel_applies",
    "needs_grad",
    "triton_available",
    "ttt_linear_decode",
    "ttt_linear_prefill",
    "ttt_linear_train",
    "ttt_mlp_decode",
    "ttt_mlp_prefill",
    "ttt_mlp_train",
    "use_kernels",
]

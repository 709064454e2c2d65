"""The TTT update rule as pure functions on tensors: the single source of truth.

`reference`: the math (LayerNorm and its L2 gradient, GELU, the inner loss, the dual and primal
forms of TTT-Linear and TTT-MLP); `stream`: continuing a sequence from any token (`ttt_continue`)
and one decoded token (`decode_step`); `kinds`: the table of the two layer kinds; `checks`: the
one shape table of the ops' arguments; `mini_batch`: token_idx and the mini-batches of a sequence.
Layers, the model and the kernels all build on these functions.
"""

from .kinds import KINDS, Kind, State, hidden_width, lookup
from .mini_batch import default_token_idx
from .reference import (
    commit_state,
    gelu_tanh,
    gelu_tanh_grad,
    inner_loss,
    inner_model,
    layer_norm,
    layer_norm_l2_grad,
    ttt_linear,
    ttt_linear_primal,
    ttt_linear_step,
    ttt_mlp,
    ttt_mlp_primal,
    ttt_mlp_step,
)
from .stream import check_stream, decode_step, ttt_continue

__all__ = [
    "KINDS",
    "Kind",
    "State",
    "check_stream",
    "commit_state",
    "decode_step",
    "default_token_idx",
    "gelu_tanh",
    "gelu_tanh_grad",
    "hidden_width",
    "inner_loss",
    "inner_model",
    "layer_norm",
    "layer_norm_l2_grad",
    "lookup",
    "ttt_continue",
    "ttt_linear",
    "ttt_linear_primal",
    "ttt_linear_step",
    "ttt_mlp",
    "ttt_mlp_primal",
    "ttt_mlp_step",
]

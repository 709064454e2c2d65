"""Continuing a sequence from any token, also inside a mini-batch: `ttt_continue` (a prompt, then
more tokens) and `decode_step` (one decoded token, as the decode kernels compute it, each row of a
batch at its own position in its mini-batch). The state is (*params, *grads): the parameters at
the start of the current mini-batch and the eta-weighted gradient sums of its tokens so far.

Shapes: B batch, H heads, T tokens, D head dim, b = mini_batch_size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import checks
from .checks import check_inputs, describe
from .kinds import State, lookup
from .reference import commit_state


def check_stream(
    kind: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    token_idx: Tensor | None,
    eps: float,
    *,
    values: bool = True,
) -> Tensor:
    """The checks of `ttt_continue`, for callers that may run a kernel instead; returns token_idx.

    Raises a ValueError or TypeError naming the first bad argument: the inputs as in `ttt_linear`,
    a state of (*params, *grads) with each gradient sum shaped like its parameter, and a position
    that is an int in [0, mini_batch_size) or, for one token (T = 1), a tensor [B] of them
    (values=False: its values are not read back from the device).
    """
    layer = lookup(kind)
    names = layer.params
    n = len(names)
    if not isinstance(state, (tuple, list)) or len(state) != 2 * n:
        got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(
            f"state of a TTT-{kind} layer must be {2 * n} tensors ({', '.join(layer.stream_names())}), got {got}"
        )
    labelled = {f"state[{i}] ({k})": t for i, (k, t) in enumerate(zip(names, state[:n]))}
    token_idx = check_inputs(layer, XQ, XK, XV, eta, labelled, ln_weight, ln_bias, mini_batch_size, token_idx, eps)
    for i, (param, grad) in enumerate(zip(state[:n], state[n:])):
        label = f"state[{n + i}] (grad_{names[i]})"
        if not isinstance(grad, Tensor) or grad.shape != param.shape:
            raise ValueError(f"{label} must have the shape of {names[i]} {list(param.shape)}, got {describe(grad)}")
        if grad.dtype != param.dtype or grad.device != param.device:
            raise ValueError(f"{label} must have the dtype and device of {names[i]}, got {grad.dtype} on {grad.device}")
    rows = XQ.shape[0] if XQ.shape[2] == 1 else None
    checks.position("position", position, mini_batch_size, rows, values=values)
    return token_idx


def decode_step(
    kind: str,
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    token_idx: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """One decoded token, what the decode kernels compute: the step (`ttt_linear_step` or
    `ttt_mlp_step`, by kind), then `commit_state` for each row whose token closes its mini-batch.

    position: an int, or a tensor [B] with each row's own position (rows of a batch whose prompts
    had different lengths). Returns z: [B, H, 1, D] and the new state.
    """
    z, state = lookup(kind).step(xq, xk, xv, eta, state, position, ln_weight, ln_bias, token_idx, eps)
    closes = position == token_idx.numel() - 1
    if not isinstance(closes, Tensor):
        return z, commit_state(state, token_idx[-1]) if closes else state
    committed = commit_state(state, token_idx[-1])
    closes = closes.view(-1, 1, 1, 1)
    return z, tuple(torch.where(closes, c, s) for c, s in zip(committed, state))


def ttt_continue(
    kind: str,
    XQ: Tensor,
    XK: Tensor,
    XV: Tensor,
    eta: Tensor,
    state: State,
    position: int | Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int = 16,
    token_idx: Tensor | None = None,
    eps: float = 1e-6,
    *,
    dual: Callable[..., State] | None = None,
) -> tuple[Tensor, State, int | Tensor]:
    """Continue a sequence from any point, also inside a mini-batch (prefill, then decode).

    kind: "linear" or "mlp". state = (*params, *grads) as in `ttt_linear_step`; position: how many
    tokens of the current mini-batch were already read (0 at a boundary, where grads are zero),
    or for one token (T = 1) a tensor [B] of each row's count (then the new position is a tensor too).
    Ragged edges run token by token, whole mini-batches in between in the dual form (`dual`,
    default `ttt_linear` or `ttt_mlp`; a kernel with the same signature can stand in); the result
    is the same as one call over the whole sequence. Returns Z: [B, H, T, D], the new state and
    the new position.
    """
    token_idx = check_stream(
        kind, XQ, XK, XV, eta, state, position, ln_weight, ln_bias, mini_batch_size, token_idx, eps
    )
    if dual is not None and not callable(dual):
        raise TypeError(f"dual must be a function like ttt_linear or None, got {type(dual).__name__}")
    if isinstance(position, Tensor):
        z, state = decode_step(
            kind, XQ, XK, XV, eta[:, :, 0], tuple(state), position, ln_weight, ln_bias, token_idx, eps
        )
        return z, state, (position + 1) % mini_batch_size
    inputs, norm = (XQ, XK, XV, eta), (ln_weight, ln_bias)
    run = _Stream(lookup(kind).step, inputs, tuple(state), position, norm, mini_batch_size, token_idx, eps)
    if position:
        run.steps_until(min(run.T, mini_batch_size - position))
    whole = (run.T - run.t) // mini_batch_size * mini_batch_size
    if whole:
        run.dual(lookup(kind).dual if dual is None else dual, whole)
    run.steps_until(run.T)
    return torch.cat(run.outputs, dim=2), run.state, run.position


class _Stream:
    """`ttt_continue` on checked arguments: the state and position after the first t tokens, and
    the outputs so far."""

    def __init__(
        self,
        step: Callable[..., tuple[Tensor, State]],
        inputs: tuple[Tensor, Tensor, Tensor, Tensor],
        state: State,
        position: int,
        norm: tuple[Tensor, Tensor],
        mini_batch_size: int,
        token_idx: Tensor,
        eps: float,
    ) -> None:
        self.step, self.inputs, self.state, self.position, self.norm = step, inputs, state, position, norm
        self.mini_batch_size, self.token_idx, self.eps = mini_batch_size, token_idx, eps
        self.T, self.t, self.outputs = inputs[0].shape[2], 0, []

    def steps_until(self, stop: int) -> None:
        """Tokens t..stop-1 token by token, committing the state where a mini-batch closes."""
        XQ, XK, XV, eta = self.inputs
        for s in range(self.t, stop):
            tok = slice(s, s + 1)
            z, self.state = self.step(
                XQ[:, :, tok], XK[:, :, tok], XV[:, :, tok], eta[:, :, s], self.state, self.position,
                *self.norm, self.token_idx, self.eps,
            )  # fmt: skip
            self.outputs.append(z)
            self.position += 1
            if self.position == self.mini_batch_size:
                self.state, self.position = commit_state(self.state, self.token_idx[-1]), 0
        self.t = stop

    def dual(self, dual: Callable[..., State], whole: int) -> None:
        """The next `whole` tokens, whole mini-batches from a mini-batch boundary, through `dual`."""
        span = slice(self.t, self.t + whole)
        n = len(self.state) // 2
        Z, *params = dual(
            *(x[:, :, span] for x in self.inputs), *self.state[:n], *self.norm,
            self.mini_batch_size, self.token_idx, self.eps,
        )  # fmt: skip
        self.state = tuple(params) + self.state[n:]
        self.outputs.append(Z)
        self.t += whole

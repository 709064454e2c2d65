"""TTT layers as `nn.Module`s around the functional ops in `ttt_helpers.ops`.

A layer projects tokens to queries, keys and values per head (optionally one query projection
through two causal convolutions, `share_qk`), rotates queries and keys by their position inside
the mini-batch (RoPE), computes a learnable per-token inner learning rate, runs the TTT op (the
hidden state is a model trained while reading), then normalises, optionally gates, and projects
the result back. The state can be passed in and out to stream a sequence in pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks, kernels, ops
from .local_attention import LocalAttention, check_hybrid
from .ops import KINDS, State


def project(
    x: Tensor, projections: Sequence[nn.Linear | None], fused: tuple[Tensor, Tensor | None] | None
) -> tuple[Tensor | None, ...]:
    """Each of `projections` applied to x: [B, T, C] -> [B, T, width] each (None for a None):
    separately, or, with `fused` (a (weight, bias) of `FusedProjections`), as one product whose
    output is split."""
    if fused is None:
        return tuple(None if p is None else p(x) for p in projections)
    widths = [p.out_features for p in projections if p is not None]
    out = F.linear(x, *fused)
    parts = iter(out.split([*widths, out.shape[-1] - sum(widths)], dim=-1))
    return tuple(None if p is None else next(parts) for p in projections)


IMPLS = ("auto", "kernel", "reference")
PATHS = ("primal", "reference", "train", "decode", "prefill")


def pick_path(
    impl: str,
    XQ: Tensor,
    mini_batch_size: int,
    tracked: tuple[object, ...],
    *,
    primal: bool = False,
    stream: bool = False,
) -> str:
    """The path a layer's call takes, one of PATHS; chosen here and nowhere else.

    "primal": the reference primal form (primal=True); "reference": the reference dual form, for
    impl "reference", or "auto" where no kernel runs (`kernels.kernel_applies`: CUDA, triton and a
    supported shape and dtype); otherwise the Triton kernels: "train" (forward and backward) when
    autograd tracks any of `tracked`, "decode" for one streamed token (stream=True, T = 1), else
    "prefill". XQ: [B, H, T, D].
    """
    if primal:
        return "primal"
    if impl == "reference" or (impl == "auto" and not kernels.kernel_applies(XQ, mini_batch_size)):
        return "reference"
    if kernels.needs_grad(tracked):
        return "train"
    return "decode" if stream and XQ.shape[2] == 1 else "prefill"


class Padding(NamedTuple):
    """Where each row of a batch holds its own tokens, in a call from a fresh state whose rows
    were laid out to keep their mini-batches aligned: mask [B, T] (True at a row's tokens, which
    are contiguous), ends [B] (one past each row's last token). A padded token changes nothing:
    its inner learning rate is 0 and the causal convolutions read a zero for it."""

    mask: Tensor
    ends: Tensor


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles positions[t] * theta^(-2i/D): [T, D/2] each, in `dtype`.

    The angles and their cos and sin are computed in float32 whatever `dtype` is, as the
    authors' model does, so a float64 model uses the same table as theirs.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of the last dimension by its angle. x: [..., T, D]; cos, sin: [T, D/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def check_padding(padding: Padding, x: Tensor, position: int | Tensor) -> None:
    """Raise unless `padding` fits x: [B, T, C] read from position 0."""
    checks.tensor("x", x, 3)
    if not isinstance(padding, Padding):
        raise TypeError(f"padding must be a Padding (mask, ends), got {type(padding).__name__}")
    B, T = x.shape[:2]
    mask, ends = padding
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, T):
        raise ValueError(f"padding.mask must be a bool tensor [{B}, {T}], got {getattr(mask, 'shape', mask)!r}")
    if not isinstance(ends, Tensor) or ends.dtype != torch.int64 or tuple(ends.shape) != (B,):
        raise ValueError(f"padding.ends must be an int64 tensor [{B}], got {getattr(ends, 'shape', ends)!r}")
    if isinstance(position, Tensor) or position != 0:
        raise ValueError(f"position must be 0 with padding (a call from a fresh state), got {position!r}")


class CausalConv(nn.Conv1d):
    """Depthwise causal convolution over time (with a bias); its state holds the last k - 1 inputs."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__(channels, channels, kernel, groups=channels, bias=True)

    def initial_state(self, x: Tensor) -> Tensor:
        """Zeros [B, k-1, C] for x: [B, T, C]: the sequence starts after k - 1 zero inputs."""
        return x.new_zeros(x.shape[0], self.kernel_size[0] - 1, x.shape[2])

    def forward(self, x: Tensor, state: Tensor | None = None, ends: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, C], state: [B, k-1, C] (None: zeros) -> (y: [B, T, C], the new state: the
        last k - 1 inputs, or with `ends` [B] those before ends[i] in row i)."""
        if state is None:
            state = self.initial_state(x)
        padded = torch.cat([state.to(x.dtype), x], dim=1)
        y = super().forward(padded.transpose(1, 2)).transpose(1, 2)
        k = state.shape[1]
        if ends is None:
            return y, padded[:, padded.shape[1] - k :].clone()  # a copy: a view would keep all T alive
        index = ends[:, None] + torch.arange(k, device=x.device)  # input t sits at t + k in `padded`
        return y, padded.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


class TTTLayer(nn.Module):
    """Shared machinery of `TTTLinear` and `TTTMLP`; subclasses define the inner model.

    hidden_size C = num_heads * head_dim D. `base_lr` scales the sigmoid gate of the inner
    learning rate: eta = base_lr * sigmoid(gate(x)) / D per token and head (None: the kind's
    `default_base_lr`, 1.0 for TTT-Linear and 0.1 for TTT-MLP). `rope_theta`: XQ and XK are
    rotated (RoPE, base rope_theta) by their position inside the mini-batch, t mod
    mini_batch_size; None rotates nothing. `share_qk`: no key projection; the query projection
    feeds two depthwise causal convolutions of width `conv_kernel`, one giving XQ and one XK
    (the Mamba backbone). `use_gate`: the output is multiplied by gelu(g_proj(x)) before o_proj.

    `window` >= 1 makes the layer a hybrid: beside the TTT branch, softmax attention of each token
    over the first `sinks` tokens and the last `window` (`LocalAttention`, Llama's rotary
    embedding of base `attention_theta`) reads the same q, k and v heads before their TTT
    rotation; the output is o_proj(attention + post_norm(Z)) (merged heads), so with post_norm's
    weight and bias at zero the layer is that attention alone. Its stream state ends with the
    attention's cache, and `forward_stream` needs `start`, the tokens read before x.
    """

    kind: str  # "linear" or "mlp": the layer's row of the table `ops.KINDS`
    default_base_lr: float

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mini_batch_size: int = 16,
        base_lr: float | None = None,
        eps: float = 1e-6,
        use_gate: bool = False,
        impl: str = "auto",
        *,
        share_qk: bool = False,
        conv_kernel: int = 4,
        rope_theta: float | None = 10000.0,
        window: int = 0,
        sinks: int = 0,
        attention_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        base_lr, eps, rope_theta = _check_layer_args(
            hidden_size, num_heads, mini_batch_size, self.default_base_lr if base_lr is None else base_lr,
            eps, use_gate, impl, share_qk, conv_kernel, rope_theta,
        )  # fmt: skip
        self.share_qk, self.rope_theta = share_qk, rope_theta
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.mini_batch_size, self.base_lr, self.eps, self.impl = mini_batch_size, base_lr, eps, impl
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        # share_qk: XQ and XK are two convolutions of the one query projection
        self.k_proj = None if share_qk else nn.Linear(hidden_size, hidden_size, bias=False)
        self.conv_q = CausalConv(hidden_size, conv_kernel) if share_qk else None
        self.conv_k = CausalConv(hidden_size, conv_kernel) if share_qk else None
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.lr_gate = nn.Linear(hidden_size, num_heads)  # one inner learning-rate gate per head
        self.token_idx_offset = nn.Parameter(torch.zeros(mini_batch_size))
        # 1/(1..b), rounded once in the dtype it is held in: made again after every cast (`_apply`),
        # so a float64 model holds the exact float64 table however it was made (built in float64,
        # cast with .double(), loaded, converted), as every loader makes it
        base = ops.default_token_idx(mini_batch_size, dtype=self.token_idx_offset.dtype)
        self.register_buffer("token_idx_base", base, persistent=False)
        # cos and sin [2, b, D/2] of the b positions a mini-batch has, in float32: made once per device
        # (`_apply`), not at every call (a decoded token only looks its row up)
        self.register_buffer("rope_table", self.rotary_table(torch.device("cpu")), persistent=False)
        self.ln_weight = nn.Parameter(torch.ones(num_heads, self.head_dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.post_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        # optional output gate (the Mamba-style backbone): y = o_proj(norm(Z) * gelu(g_proj(x)))
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False) if use_gate else None
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.lr_gate, self.o_proj, self.g_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=0.02)
        nn.init.zeros_(self.lr_gate.bias)
        self.init_inner_model(num_heads, self.head_dim)
        # (weight, bias) of input_projections() as one product, while a FusedProjections is applied
        self.fused: tuple[Tensor, Tensor | None] | None = None
        check_hybrid(window, sinks, share_qk)
        self.local = LocalAttention(window, sinks, self.head_dim, attention_theta) if window else None

    def _apply(self, fn, recurse: bool = True):
        """As `nn.Module._apply` (`.double()`, `.to(...)`), then 1/(1..b) made again in its new
        dtype (a float32 table cast to float64 would keep float32's rounding) and the rotary table
        again in float32 on its new device, as a call would compute it there."""
        super()._apply(fn, recurse)
        base = self.token_idx_base
        if not base.is_meta:
            self.token_idx_base = ops.default_token_idx(self.mini_batch_size, dtype=base.dtype, device=base.device)
        if self.rope_table is not None and not self.rope_table.is_meta:
            self.rope_table = self.rotary_table(self.rope_table.device)
        return self

    def rotary_table(self, device: torch.device) -> Tensor | None:
        """cos and sin of the rotary angles of positions 0 .. b - 1: [2, b, D/2] in float32 (None without RoPE)."""
        if self.rope_theta is None:
            return None
        positions = torch.arange(self.mini_batch_size, device=device)
        return torch.stack(rope_tables(positions, self.head_dim, self.rope_theta, torch.float32))

    def init_inner_model(self, H: int, D: int) -> None:
        """Create the learned initial state of the inner model as parameters, named as in the kind's
        table (`ops.KINDS`): weights [H, ...] ~ N(0, 0.02^2), biases zero; the MLP's width is 4D."""
        for name, shape in zip(KINDS[self.kind].params, KINDS[self.kind].head_shapes(D, 4 * D)):
            value = torch.randn(H, *shape) * 0.02 if name.startswith("W") else torch.zeros(H, *shape)
            setattr(self, name, nn.Parameter(value))

    def initial_params(self) -> State:
        """The learned initial state, without a batch dimension."""
        return tuple(getattr(self, name) for name in KINDS[self.kind].params)

    def initial_state(self, batch_size: int) -> State:
        """The learned initial state for a batch: tensors [B, H, ...]."""
        checks.integer("batch_size", batch_size, 1)
        return tuple(p.unsqueeze(0).expand(batch_size, *p.shape) for p in self.initial_params())

    def token_idx(self) -> Tensor:
        """Per-position step scale of a mini-batch: 1/(1..b) plus a learned offset, kept >= 0. [b]"""
        return (self.token_idx_base + self.token_idx_offset).clamp(min=0.0)

    def inner_lr(self, x: Tensor) -> Tensor:
        """eta = base_lr * sigmoid(gate(x)) / D. x: [B, T, C] -> [B, H, T]"""
        return self._eta(self.lr_gate(x))

    def _eta(self, gate: Tensor) -> Tensor:
        """`inner_lr` from the gate's logits lr_gate(x): [B, T, H] -> [B, H, T]"""
        return self.base_lr * torch.sigmoid(gate).transpose(1, 2) / self.head_dim

    def input_projections(self) -> tuple[nn.Linear | None, ...]:
        """The products that read the layer's input, in order: q_proj, k_proj (None with
        share_qk), v_proj, lr_gate, g_proj (None without use_gate)."""
        return self.q_proj, self.k_proj, self.v_proj, self.lr_gate, self.g_proj

    def _inputs(
        self,
        x: Tensor,
        position: int | Tensor = 0,
        conv_state: Tensor | None = None,
        padding: Padding | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
        """XQ, XK, XV: [B, H, T, D], eta: [B, H, T], g_proj(x): [B, T, C] (None without use_gate),
        the new convolution state (share_qk; else None) and, for a hybrid layer, the query and key
        heads before the TTT rotation (else None), for x: [B, T, C] whose first token
        sits at `position` in its mini-batch (an int, or for one token a tensor [B], each row at
        its own position); with `padding`, eta is 0 and the convolutions read 0 at padded tokens."""
        checks.tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, T, {self.hidden_size}], got {list(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must hold at least one row and one token (B, T >= 1), got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor (hidden states, not token ids), got {x.dtype}")
        q, k, v, gate, g = project(x, self.input_projections(), self.fused)
        if self.share_qk:
            if padding is not None:
                q = q * padding.mask[:, :, None].to(q.dtype)
            XQ, _ = self.conv_q(q, conv_state)
            XK, conv_state = self.conv_k(q, conv_state, None if padding is None else padding.ends)
            XQ, XK = self._heads(XQ), self._heads(XK)
        else:
            XQ, XK = self._heads(q), self._heads(k)
        unrotated = (XQ, XK) if self.local is not None else None
        if self.rope_table is not None:
            table = self.rope_table.to(XQ.dtype)
            if isinstance(position, Tensor):  # one token, each row at its own position: tables [B, 1, 1, D/2]
                cos, sin = (t[position].view(x.shape[0], 1, 1, -1) for t in table)
            else:
                positions = (torch.arange(x.shape[1], device=x.device) + position) % self.mini_batch_size
                cos, sin = table[:, positions]
            XQ, XK = apply_rope(XQ, cos, sin), apply_rope(XK, cos, sin)
        eta = self._eta(gate)
        if padding is not None:
            eta = eta * padding.mask[:, None, :].to(eta.dtype)
        return XQ, XK, self._heads(v), eta, g, conv_state, unrotated

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _output(self, Z: Tensor, g: Tensor | None, attention: Tensor | None = None) -> Tensor:
        """Merge the heads of Z: [B, H, T, D], normalise, add the hybrid's attention output [B, H, T, D]
        (None: none), gate by gelu(g) (g = g_proj(x): [B, T, C]; None: no gate), project. -> [B, T, C]"""
        B, _, T, _ = Z.shape
        y = self.post_norm(Z.transpose(1, 2).reshape(B, T, self.hidden_size))
        if attention is not None:
            y = attention.transpose(1, 2).reshape(B, T, self.hidden_size).to(y.dtype) + y
        if g is not None:
            y = y * ops.gelu_tanh(g)
        return self.o_proj(y)

    def forward(self, x: Tensor, state: State | None = None, *, primal: bool = False) -> tuple[Tensor, State]:
        """x: [B, T, C] -> (y: [B, T, C], final state). `state=None` starts from the learned state.

        Passing the returned state into the next call continues the sequence; splitting it at a
        multiple of `mini_batch_size` gives the same outputs as one call. A `share_qk` layer has a
        convolution state too: continue it with `forward_stream`.
        """
        checks.boolean("primal", primal)
        if (self.share_qk or self.local is not None) and state is not None:
            what = "a share_qk layer (it has a conv state)" if self.share_qk else "a hybrid layer (attention cache)"
            raise ValueError(f"state: {what} continues a sequence through forward_stream")
        XQ, XK, XV, eta, g, _, unrotated = self._inputs(x)
        attention = None if self.local is None else self.local(*unrotated, XV, 0)[0]
        if state is None:
            state = self.initial_state(x.shape[0])
        n = len(self.initial_params())
        if not isinstance(state, (tuple, list)) or len(state) != n:
            got = f"{len(state)} tensors" if isinstance(state, (tuple, list)) else type(state).__name__
            hint = " (forward takes the parameters only; forward_stream takes *params, *grads)"
            raise ValueError(f"state of a TTT-{self.kind} layer must be {n} tensors{hint}, got {got}")
        kind, path = KINDS[self.kind], self._path(XQ, (XQ, XK, XV, eta, *state), primal=primal)
        if path in ("primal", "reference"):
            op = kind.primal if path == "primal" else kind.dual
        else:
            prefill, _, train = kind.kernels()
            op = train if path == "train" else prefill
        Z, *new_state = op(
            XQ,
            XK,
            XV,
            eta,
            *state,
            self.ln_weight,
            self.ln_bias,
            mini_batch_size=self.mini_batch_size,
            token_idx=self.token_idx(),
            eps=self.eps,
        )
        return self._output(Z, g, attention), tuple(new_state)

    def initial_stream_state(self, batch_size: int) -> State:
        """The learned state plus zero gradient sums (and, with share_qk, the zero convolution
        state [B, k-1, C]): the state `forward_stream` starts from."""
        params = self.initial_state(batch_size)
        state = params + tuple(torch.zeros_like(p) for p in params)
        if self.share_qk:
            w = self.q_proj.weight
            state += (w.new_zeros(batch_size, self.conv_q.kernel_size[0] - 1, self.hidden_size),)
        if self.local is not None:
            state += self.local.initial_cache(self.ln_weight[:, 0], batch_size)
        return state

    def forward_stream(
        self,
        x: Tensor,
        state: State,
        position: int | Tensor,
        *,
        padding: Padding | None = None,
        start: int | None = None,
    ) -> tuple[Tensor, State, int | Tensor]:
        """Continue from any token, also inside a mini-batch (prefill, then decode one token at a time).

        x: [B, T, C]; state = (*params, *grads[, conv]) from `initial_stream_state` or a previous
        call; position: tokens already read in the current mini-batch, an int or, for one token
        (T = 1), an int tensor [B] on x's device with each row's own count (rows whose prompts had
        different lengths; its values are not read back, so a CUDA graph can capture the step).
        padding: which tokens are padding (see `Padding`), at position 0 only, the convolution
        state being the new one's zeros. A hybrid layer (window >= 1) needs `start`, the tokens read
        before x (an int, or with a tensor position an int64 tensor [1] on the device: every row at
        the same place), and takes no padding. Returns y, the state,
        the position (a new tensor for a tensor).
        """
        if padding is not None:
            check_padding(padding, x, position)
        conv_state, attention = None, None
        if self.share_qk or self.local is not None:
            tail = 1 if self.share_qk else 4
            if not isinstance(state, (tuple, list)) or len(state) <= tail:
                raise ValueError("state must be the tuple of tensors from initial_stream_state or forward_stream")
            state, ends = tuple(state[:-tail]), tuple(state[-tail:])
            conv_state, attention = (ends[0], None) if self.share_qk else (None, ends)
        if self.local is not None:
            if padding is not None:
                raise ValueError("a hybrid layer (window >= 1) reads every row from the same token: no padding")
            if isinstance(start, Tensor) != isinstance(position, Tensor):
                raise ValueError("start and position: both ints, or both tensors on the device (one token)")
            if not isinstance(start, Tensor):
                checks.integer("start", start, 0)
                if start % self.mini_batch_size != position:
                    raise ValueError(f"start ({start}) must sit at position ({position}) of its mini-batch")
        elif start is not None:
            raise ValueError("start is for a hybrid layer (window >= 1) only")
        y, state, position = self._stream(x, state, position, conv_state, padding, (start, attention))
        return y, state, position

    def _stream(
        self,
        x: Tensor,
        state: State,
        position: int | Tensor,
        conv_state: Tensor | None,
        padding: Padding | None,
        local: tuple[int | None, tuple[Tensor, ...] | None],
    ) -> tuple[Tensor, State, int | Tensor]:
        """forward_stream on the TTT state alone; the new convolution state or attention cache, if
        any, ends the returned state. local: (start, the attention cache) of a hybrid layer."""
        rows = x.shape[0] if isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] == 1 else None
        checks.position("position", position, self.mini_batch_size, rows, values=False)
        XQ, XK, XV, eta, g, conv_state, unrotated = self._inputs(x, position, conv_state, padding)
        attention = None
        if self.local is None:
            tail = () if conv_state is None else (conv_state,)
        else:
            attention, tail = self.local(*unrotated, XV, *local)
        token_idx, dual = self.token_idx(), None
        stream = (self.kind, XQ, XK, XV, eta, state, position, self.ln_weight, self.ln_bias)
        path = self._path(XQ, (XQ, XK, XV, eta, *state), stream=True)
        if path != "reference":
            prefill, decode, train = KINDS[self.kind].kernels()
            dual = train if path == "train" else prefill  # whole mini-batches; ragged edges by reference
        if path == "decode":  # one decoded token: the decode kernel updates the state in place
            # the only path that skips ttt_continue: its checks, run here, are the only ones
            ops.check_stream(*stream, self.mini_batch_size, token_idx, self.eps, values=False)
            state = tuple(t.contiguous() for t in state)
            z = decode(
                XQ, XK, XV, eta[:, :, 0], state, position, self.ln_weight, self.ln_bias, token_idx, self.eps,
                check=not kernels.kernel_applies(XQ, self.mini_batch_size),
            )  # fmt: skip
            return self._output(z, g, attention), state + tail, (position + 1) % self.mini_batch_size
        Z, state, position = ops.ttt_continue(
            *stream, mini_batch_size=self.mini_batch_size, token_idx=token_idx, eps=self.eps, dual=dual
        )
        return self._output(Z, g, attention), tuple(state) + tail, position

    def _path(self, XQ: Tensor, tracked: tuple[Tensor, ...], *, primal: bool = False, stream: bool = False) -> str:
        """`pick_path` for this layer: autograd tracks the call's tensors or the layer's own."""
        tracked = (*tracked, self.ln_weight, self.ln_bias, self.token_idx_offset)
        return pick_path(self.impl, XQ, self.mini_batch_size, tracked, primal=primal, stream=stream)


class TTTLinear(TTTLayer):
    """TTT layer whose hidden state is a linear model f(x) = x W0 + b0 per head."""

    kind = "linear"
    default_base_lr = KINDS["linear"].default_base_lr


class TTTMLP(TTTLayer):
    """TTT layer whose hidden state is a two-layer MLP f(x) = gelu(x W1 + b1) W2 + b2, width 4D."""

    kind = "mlp"
    default_base_lr = KINDS["mlp"].default_base_lr


def _check_layer_args(
    hidden_size: int,
    num_heads: int,
    mini_batch_size: int,
    base_lr: float,
    eps: float,
    use_gate: bool,
    impl: str,
    share_qk: bool,
    conv_kernel: int,
    rope_theta: float | None,
) -> tuple[float, float, float | None]:
    """Raise unless a TTT layer's arguments are valid; returns base_lr, eps and rope_theta as floats."""
    checks.one_of("impl", impl, IMPLS)
    checks.integer("hidden_size", hidden_size, 1)
    checks.integer("num_heads", num_heads, 1)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    checks.integer("mini_batch_size", mini_batch_size, 1)
    base_lr = checks.positive("base_lr", base_lr)
    eps = checks.positive("eps", eps)
    checks.boolean("use_gate", use_gate)
    checks.boolean("share_qk", share_qk)
    checks.integer("conv_kernel", conv_kernel, 1)
    if rope_theta is not None:
        rope_theta = checks.positive("rope_theta", rope_theta)
    if rope_theta is not None and (hidden_size // num_heads) % 2:
        raise ValueError(f"RoPE needs an even head_dim, got hidden_size // num_heads = {hidden_size // num_heads}")
    return base_lr, eps, rope_theta

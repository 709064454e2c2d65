"""Softmax attention over a few first tokens and a short window of the last ones (StreamingLLM).

Xiao et al. (2023, arXiv 2309.17453) found that a pretrained Transformer keeps working with a
constant-size cache when it keeps the first few tokens ("attention sinks", which soak up attention
that has nowhere better to go) and the last `window` tokens, each key at its place in the cache.
`LocalAttention` is that attention as a module without weights: it takes the heads of a layer's
own queries, keys and values and gives the attention output, so a TTT layer can carry it beside
its TTT branch (a hybrid layer: the window sees the last tokens exactly, the TTT state the rest).

Token t (counted from the sequence's first) sees token j <= t when t - j < window (the window,
the current token included) or j < sinks. Rotary positions are those of the cache: a window key
sits at its own distance t - j from the query; once a sink has left the window it sits right
before the window's oldest key, at distance min(t, sinks + window - 1) - j, whatever t is. So no
distance exceeds sinks + window - 1, and a long document looks, position by position, like the
short ones the model was trained on. The rotation is Llama's (the two halves of a head rotate
together), so a layer converted from a Llama reproduces its attention inside the window.

The cache `(keys, values, sink_keys, sink_values)` holds the last `window` keys and values
[B, H, window, D] (rotated keys; zeros before the sequence starts) and the first `sinks`
[B, H, sinks, D]: its size never grows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import checks

AttentionCache = tuple[Tensor, Tensor, Tensor, Tensor]


def check_hybrid(window: int, sinks: int, share_qk: bool = False, *, prefix: str = "") -> None:
    """Raise unless `window` and `sinks` (named prefix + "window", prefix + "sinks") describe hybrid
    layers or none: ints >= 0, sinks only with a window, a window only beside a key projection."""
    checks.integer(prefix + "window", window, 0)
    checks.integer(prefix + "sinks", sinks, 0)
    if sinks and not window:
        raise ValueError(f"{prefix}sinks ({sinks}) need {prefix}window >= 1 (a hybrid layer)")
    if window and share_qk:
        raise ValueError(f"{prefix}window: the hybrid layer needs its own key projection (share_qk=False)")


def llama_rope_table(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [T, D] of Llama's rotary angles position * theta^(-2i/D) (each repeated for the
    two halves of a head), in float32, as transformers' Llama computes them. positions: [T]"""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    angles = positions.float()[:, None] * (1.0 / theta**exponent)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def llama_rope(x: Tensor, table: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x: [B, H, T, D] by the angles of `llama_rope_table` [T, D], Llama's way: dimension i
    pairs with i + D/2; cos and sin cast to x's dtype before they multiply."""
    cos, sin = (t.to(x.dtype) for t in table)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LocalAttention(nn.Module):
    """Causal softmax attention of each token over the first `sinks` tokens and the last `window`
    (itself included), with cache-relative rotary positions (see the module's docstring).

    window >= 1, sinks >= 0, head_dim D (even), rope_theta: the rotary base. No parameters.
    """

    def __init__(self, window: int, sinks: int, head_dim: int, rope_theta: float) -> None:
        super().__init__()
        self.window = checks.integer("window", window, 1)
        self.sinks = checks.integer("sinks", sinks, 0)
        checks.integer("head_dim", head_dim, 2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {head_dim}")
        self.head_dim, self.rope_theta = head_dim, checks.positive("rope_theta", rope_theta)

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks}"

    def initial_cache(self, like: Tensor, batch_size: int) -> AttentionCache:
        """An empty cache for `batch_size` rows, zeros in like's dtype and device: (keys, values)
        [B, H, window, D] and (sink keys, sink values) [B, H, sinks, D], H = like.shape[0]."""
        H = like.shape[0]
        window = like.new_zeros(batch_size, H, self.window, self.head_dim)
        sink = like.new_zeros(batch_size, H, self.sinks, self.head_dim)
        return window, window.clone(), sink, sink.clone()

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, start: int | Tensor, cache: AttentionCache | None = None
    ) -> tuple[Tensor, AttentionCache]:
        """q, k, v: [B, H, T, D] (not rotated) of tokens start .. start + T - 1; cache: what the
        tokens before start left (None: start must be 0). -> (output [B, H, T, D], the new cache).
        start may be an int64 tensor [1] on the device for one token (T = 1, with a cache): nothing
        is then read back to the host, so a CUDA graph can capture the step.

        The window is computed in blocks of b = min(window, T) queries, each against the window + b
        keys that can reach it, and the sinks as a [T, sinks] score table; one softmax covers both, in float32
        (float64 for float64 inputs).
        """
        B, H, T, D = q.shape
        on_device = isinstance(start, Tensor)
        if on_device and (T != 1 or cache is None or start.shape != (1,)):
            raise ValueError("start as a tensor [1] is for one token (T = 1) continuing a cache")
        if not on_device:
            checks.integer("start", start, 0)
        if cache is None:
            if start != 0:
                raise ValueError(f"start is {start}: a sequence continued past its first token needs its cache")
            cache = self.initial_cache(q.new_empty(H), B)
        w, s = self.window, self.sinks
        keys, values, sink_keys, sink_values = cache
        t = start + torch.arange(T, device=q.device)  # start may live on the device
        table = llama_rope_table(t, D, self.rope_theta)
        kr = llama_rope(k, table)
        sink_keys, sink_values = self._store_sinks(kr, v, start, sink_keys, sink_values)
        all_keys, all_values = torch.cat((keys.to(kr.dtype), kr), dim=2), torch.cat((values.to(v.dtype), v), dim=2)
        b = min(w, T)  # queries per block: one block for a short call (a decode step)
        blocks = -(-T // b)
        pad = blocks * b - T  # queries (and keys) padded to whole blocks
        qr = llama_rope(q, table)
        qb = nn.functional.pad(qr, (0, 0, 0, pad)).view(B, H, blocks, b, D)
        kb = nn.functional.pad(all_keys, (0, 0, 0, pad)).unfold(2, w + b, b)  # [B, H, blocks, D, w + b]
        vb = nn.functional.pad(all_values, (0, 0, 0, pad)).unfold(2, w + b, b)
        scale, exact = 1.0 / math.sqrt(D), torch.promote_types(q.dtype, torch.float32)  # float32 or wider
        scores = torch.einsum("bhnqd,bhndk->bhnqk", qb, kb).to(exact) * scale
        # block n, query i: token start + n b + i; key j: token start - w + n b + j
        i = torch.arange(b, device=q.device)[:, None]
        j = torch.arange(w + b, device=q.device)[None, :]
        key_pos = start - w + torch.arange(blocks, device=q.device)[:, None, None] * b + j
        seen = (j > i) & (j <= i + w) & (key_pos >= 0)  # [blocks, b, w + b]
        scores = scores.masked_fill(~seen, float("-inf"))
        if s:
            sink_scores = self._sink_scores(q, t, sink_keys, scale, exact)
            sink_scores = nn.functional.pad(sink_scores, (0, 0, 0, pad), value=float("-inf"))
            scores = torch.cat((scores, sink_scores.view(B, H, blocks, b, s)), dim=-1)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.einsum("bhnqk,bhndk->bhnqd", probs[..., : w + b], vb)
        out = out.reshape(B, H, blocks * b, D)[:, :, :T]
        if s:
            sink_probs = probs[..., w + b :].reshape(B, H, blocks * b, s)[:, :, :T]
            out = out + torch.einsum("bhtj,bhjd->bhtd", sink_probs, sink_values.to(v.dtype))
        new = (all_keys[:, :, -w:].clone(), all_values[:, :, -w:].clone(), sink_keys, sink_values)
        return out, new

    def _store_sinks(
        self, kr: Tensor, v: Tensor, start: int | Tensor, sink_keys: Tensor, sink_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The sink cache [B, H, sinks, D] with the call's tokens that are sinks written in (new
        tensors); kr, v: [B, H, T, D], the rotated keys and values of tokens start ..
        start + T - 1. A device start (one token) writes its slot, if it has one, without being read."""
        s = self.sinks
        if isinstance(start, Tensor):
            if not s:
                return sink_keys, sink_values
            slot = (torch.arange(s, device=kr.device) == start)[None, None, :, None]
            return torch.where(slot, kr, sink_keys), torch.where(slot, v, sink_values)
        if start >= s:
            return sink_keys, sink_values
        n = min(s, start + kr.shape[2]) - start
        keys = torch.cat((sink_keys[:, :, :start], kr[:, :, :n], sink_keys[:, :, start + n :]), dim=2)
        return keys, torch.cat((sink_values[:, :, :start], v[:, :, :n], sink_values[:, :, start + n :]), dim=2)

    def _sink_scores(self, q: Tensor, t: Tensor, sink_keys: Tensor, scale: float, exact: torch.dtype) -> Tensor:
        """Scores [B, H, T, sinks] (times `scale`, in `exact`) of the queries q [B, H, T, D] (not
        rotated) at times t [T] against the sinks, -inf while a sink is still inside a query's
        window; each query is rotated to its place in the cache, min(t, sinks + window - 1)."""
        s, w, D = self.sinks, self.window, q.shape[-1]
        qs = llama_rope(q, llama_rope_table(torch.clamp(t, max=s + w - 1), D, self.rope_theta))
        scores = torch.einsum("bhtd,bhjd->bhtj", qs, sink_keys.to(qs.dtype)).to(exact) * scale
        seen = torch.arange(s, device=q.device)[None, :] <= t[:, None] - w  # out of the window only
        return scores.masked_fill(~seen, float("-inf"))

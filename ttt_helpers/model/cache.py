"""What a TTT model carries from one call to the next (`TTTCache`), and left padding.

A left-padded batch runs each row as it would run alone. `left_padding` reads how many padding
tokens start each row from an attention mask; the cache records them (`TTTCache.starts`) and
each row's position in its mini-batch (`TTTCache.row_positions`, or `positions` on the device for
one token per row). The prompt runs in one call laid out by an `Alignment`, which moves each
row's tokens so that its mini-batches start at its first token; a longer later call runs in
groups of rows at the same position (`TTTCache.by_position`, then `TTTCache.join`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .. import checks
from ..layers import Padding


@dataclass
class TTTCache:
    """Everything a TTT model carries from one call to the next.

    states[i]: layer i's TTT state (*params, *grads[, qk]): the weights at the start of the current
    mini-batch, the gradient sums inside it and, with share_qk, the last conv_kernel - 1 query
    projections [B, k-1, C] that conv_q and conv_k read; conv_states[i]: the last conv_kernel - 1
    inputs of layer i's pre_conv [B, k-1, C] (None without pre_conv); seen_tokens: tokens read so
    far, padding included; starts: for a left-padded batch, how many of them were padding in each
    row (row i has read seen_tokens - starts[i] tokens); positions: None, or each row's position in
    its mini-batch as an int32 tensor [B] on the model's device, kept in step with seen_tokens by
    the model, so that a one-token step reads it there and not from the host (the CUDA-graph
    decoder keeps one; a left-padded batch decodes through it); tokens: None, or seen_tokens as an
    int64 tensor [1] on the device, kept with positions (a hybrid layer's attention reads it). Its
    size does not depend on seen_tokens. broken: None, or why the cache can no longer be continued
    (a call that failed part-way).
    """

    states: list[tuple[Tensor, ...]]
    conv_states: list[Tensor | None]
    seen_tokens: int = 0
    starts: list[int] | None = None  # left padding per row of a ragged batch (None: no padding)
    positions: Tensor | None = None
    broken: str | None = None  # why the cache may be half-updated (a call on it failed): None while usable
    tokens: Tensor | None = None  # seen_tokens on the device, kept with positions
    # What generate() asks of a cache it is given: not a static KV cache to compile (the CUDA-graph
    # decoder captures decoding instead), every layer a recurrent state, its length.
    is_compileable: ClassVar[bool] = False

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def tensors(self) -> list[Tensor]:
        """Every tensor of the states and convolution states, in a fixed order."""
        return [t for s in self.states for t in s] + [c for c in self.conv_states if c is not None]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def row_positions(self, mini_batch_size: int) -> list[int]:
        """Each row's position in its mini-batch, from seen_tokens and starts (no device read)."""
        starts = self.starts or [0] * self.states[0][0].shape[0]
        return [(self.seen_tokens - s) % mini_batch_size for s in starts]

    def keep_positions(self, mini_batch_size: int) -> Tensor:
        """`positions`, made from `row_positions` if the cache has none yet, else refreshed in
        place (so a CUDA graph that reads it stays valid)."""
        values = torch.tensor(self.row_positions(mini_batch_size), dtype=torch.int32)
        count = torch.tensor([self.seen_tokens], dtype=torch.int64)
        if self.positions is None:
            device = self.states[0][0].device
            self.positions, self.tokens = values.to(device), count.to(device)
        else:
            self.positions.copy_(values)
            self.tokens.copy_(count)
        return self.positions

    def position(self, tokens: int, mini_batch_size: int) -> int | Tensor:
        """Where a call of `tokens` tokens per row starts in its mini-batch: `positions` (each row
        its own, on the device) for one token where the cache keeps them, else one int for every row."""
        if self.positions is not None and tokens == 1:
            return self.positions
        return self.seen_tokens % mini_batch_size

    def start(self, tokens: int) -> int | Tensor:
        """How many tokens came before a call of `tokens` tokens per row: `tokens` (on the device) for
        one token where the cache keeps positions, else seen_tokens (a hybrid layer's attention reads it)."""
        if self.positions is not None and tokens == 1:
            return self.tokens
        return self.seen_tokens

    def advance(self, tokens: int, mini_batch_size: int) -> None:
        """Count `tokens` more tokens read by every row, `positions` included (on the device for one)."""
        self.seen_tokens += tokens
        if self.positions is not None and tokens == 1:  # on the device: no host sync
            self.positions.add_(1).remainder_(mini_batch_size)
            self.tokens.add_(1)
        elif self.positions is not None:
            self.keep_positions(mini_batch_size)

    def detach(self) -> TTTCache:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return TTTCache(
            [tuple(t.detach() for t in s) for s in self.states],
            [None if c is None else c.detach() for c in self.conv_states],
            self.seen_tokens,
            self.starts,
            self.positions,
            self.broken,
            self.tokens,
        )

    def clone(self) -> TTTCache:
        """A copy of the states and convolution states that later updates of this cache leave alone."""
        return TTTCache(
            [tuple(t.clone() for t in s) for s in self.states],
            [None if c is None else c.clone() for c in self.conv_states],
            self.seen_tokens,
        )

    def rows(self, index: Tensor, seen_tokens: int) -> TTTCache:
        """The cache of the rows `index` (copies), as if each had read `seen_tokens` tokens."""
        return TTTCache(
            [tuple(t[index] for t in s) for s in self.states],
            [None if c is None else c[index] for c in self.conv_states],
            seen_tokens,
        )

    def by_position(self, mini_batch_size: int) -> list[tuple[list[int], TTTCache]]:
        """The rows of a left-padded batch in groups at the same position in their mini-batch:
        [(row indices, their cache as if they had read no padding)], in order of first row."""
        groups: dict[int, list[int]] = {}
        for i, position in enumerate(self.row_positions(mini_batch_size)):
            groups.setdefault(position, []).append(i)
        device = self.states[0][0].device
        starts = self.starts or [0] * self.states[0][0].shape[0]
        return [
            (rows, self.rows(torch.tensor(rows, device=device), self.seen_tokens - starts[rows[0]]))
            for rows in groups.values()
        ]

    @staticmethod
    def join(parts: list[tuple[list[int], TTTCache]], seen_tokens: int, starts: list[int]) -> TTTCache:
        """One cache from the caches of groups of rows: parts = [(row indices, their cache)]."""
        order = torch.tensor([i for rows, _ in parts for i in rows])
        inverse = torch.argsort(order)
        caches = [c for _, c in parts]

        def gather(tensors: list[Tensor]) -> Tensor:
            joined = torch.cat(tensors)
            return joined[inverse.to(joined.device)]

        states = [
            tuple(gather([c.states[j][k] for c in caches]) for k in range(len(s)))
            for j, s in enumerate(caches[0].states)
        ]
        convs = [
            None if c is None else gather([p.conv_states[j] for p in caches])
            for j, c in enumerate(caches[0].conv_states)
        ]
        return TTTCache(states, convs, seen_tokens, starts)

    def take(self, other: TTTCache, mini_batch_size: int) -> None:
        """Hold `other`'s states, count and padding from now on, in place (its `positions` refreshed)."""
        self.states, self.conv_states = other.states, other.conv_states
        self.seen_tokens, self.starts = other.seen_tokens, other.starts
        if self.positions is not None:
            self.keep_positions(mini_batch_size)


def left_padding(attention_mask: Tensor | None, cache: TTTCache | None, B: int, T: int) -> list[int] | None:
    """How many padding tokens start each row (None: no padding) of a call of T tokens per row,
    from attention_mask [B, T] or [B, seen + T] and the cache's own record; refuses any other
    padding than a prompt's left padding."""
    seen = 0 if cache is None else cache.seen_tokens
    known = None if cache is None else cache.starts
    if attention_mask is None:
        return known
    checks.tensor("attention_mask", attention_mask, 2)
    if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, seen + T):
        raise ValueError(
            f"attention_mask must have shape [{B}, {seen + T}] (every token so far) or [{B}, {T}], "
            f"got {list(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    if bool(mask.all()):  # the common case: one read of the mask
        if known is not None and attention_mask.shape[1] == seen + T:
            raise ValueError(f"attention_mask has no padding, but the cache's rows started with {known} padding tokens")
        return known
    if seen and not bool(mask[:, -T:].all()):
        raise ValueError("attention_mask: only the prompt (the first call) may be padded; later tokens must be 1s")
    if bool((mask.int().diff(dim=1) < 0).any()):
        raise ValueError("attention_mask must pad on the left (each row 0s, then 1s): pad prompts on the left")
    starts = (~mask).sum(dim=1).tolist()
    if max(starts) >= seen + T:
        raise ValueError("attention_mask: every row needs at least one token that is not padding")
    if seen and starts != known:
        raise ValueError(f"attention_mask's padding {starts} is not the cache's ({known}): the cache read those tokens")
    return starts


class Alignment(NamedTuple):
    """A left-padded prompt [B, T] (row i's first starts[i] tokens padding) laid out as [B, L] so
    that it runs in one call with each row as it would run alone. Row i's n_i tokens move to start
    at a multiple of the mini-batch size b, so that every row's whole mini-batches end at the same
    token and the rest of each row (n_i % b tokens) follows from position 0 of a mini-batch: whole
    mini-batches of padding before a row's tokens, some after them, none within.

    source: [B, L], where each token of the layout comes from in the prompt; back: [B, T], where
    each token of the prompt went; valid: [B, T], True at the prompt's own tokens; padding: the
    layout's `Padding` (which changes nothing)."""

    source: Tensor
    back: Tensor
    valid: Tensor
    padding: Padding

    @classmethod
    def of(cls, starts: list[int], T: int, mini_batch_size: int, device: torch.device) -> Alignment:
        """The layout of a prompt of T tokens per row whose rows start with `starts` padding tokens."""
        b = mini_batch_size
        lengths = [T - s for s in starts]
        whole = max(n // b for n in lengths)
        offsets = [(whole - n // b) * b for n in lengths]  # where each row's tokens start now
        L = whole * b + max(n % b for n in lengths)
        offset, length, start = (torch.tensor(v, device=device)[:, None] for v in (offsets, lengths, starts))
        t = torch.arange(L, device=device)
        mask = (t >= offset) & (t < offset + length)
        source = (t - offset + start).clamp(0, T - 1)
        u = torch.arange(T, device=device)
        back = (u - start + offset).clamp(0, L - 1)
        return cls(source, back, u >= start, Padding(mask, (offset + length)[:, 0]))

    def align(self, x: Tensor) -> Tensor:
        """x: [B, T, C] in the prompt's layout -> [B, L, C] in this one."""
        return x.gather(1, self.source[:, :, None].expand(-1, -1, x.shape[2]))

    def restore(self, y: Tensor) -> Tensor:
        """y: [B, L, C] in this layout -> [B, T, C] in the prompt's, 0 at padding."""
        out = y.gather(1, self.back[:, :, None].expand(-1, -1, y.shape[2]))
        return torch.where(self.valid[:, :, None], out, 0)

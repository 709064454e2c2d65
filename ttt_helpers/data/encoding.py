"""Encodings of text as token ids: UTF-8 bytes (a 256-symbol vocabulary) or a tokenizer's ids."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks


def encode_bytes(text: str) -> Tensor:
    """UTF-8 bytes as token ids in 0..255 (a 256-symbol vocabulary for tiny models). [N] int64"""
    checks.string("text", text, empty=True)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode_bytes(ids: Tensor | list[int]) -> str:
    """Inverse of `encode_bytes`; invalid UTF-8 sequences become U+FFFD."""
    if isinstance(ids, Tensor):
        checks.token_ids("ids", ids, 256)
        values = ids.tolist()
    elif isinstance(ids, (list, tuple)):
        values = list(ids)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 256]
        if bad:
            raise ValueError(f"ids must be byte values, ints in [0, 256), got {bad[0]!r}")
    else:
        raise TypeError(f"ids must be a tensor or a list of ints in [0, 256), got {type(ids).__name__}")
    return bytes(values).decode("utf-8", errors="replace")


def encode_tokens(text: str, tokenizer) -> Tensor:
    """Token ids of a Hugging Face tokenizer, without special tokens. [N] int64"""
    checks.string("text", text, empty=True)
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable on a string), got {type(tokenizer).__name__}"
        )
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def encode(text: str, tokenizer=None) -> Tensor:
    """Token ids [N] of `text`: `encode_bytes` when tokenizer is None, else `encode_tokens`."""
    checks.string("text", text, empty=True)
    return encode_bytes(text) if tokenizer is None else encode_tokens(text, tokenizer)

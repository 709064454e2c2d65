"""Argument checks shared by the public functions of ttt_helpers.

Each check raises a TypeError (wrong kind of value) or a ValueError (right kind, bad value)
whose message names the argument and says what was expected, and returns the value, so a
function can check its arguments where they enter, before any work is done.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in [low, high] (either bound optional). -> value"""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise ValueError(f"{name} must be >= {low}, got {value}")
        if low is None:
            raise ValueError(f"{name} must be <= {high}, got {value}")
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def optional_integer(name: str, value: Any, low: int | None = None) -> int | None:
    """None, or an int >= low. -> value"""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and low is not None and value < low:
        raise ValueError(f"{name} must be >= {low} or None, got {value}")
    return integer(name, value, low)


def real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite int or float (not a bool) in the range [low, high]; `low_open` / `high_open` exclude
    the bound itself. -> float(value)"""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if high is None:
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
        if low is None:
            raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value}")
    return value


def positive(name: str, value: Any) -> float:
    """A finite number > 0. -> float(value)"""
    return real(name, value, 0, low_open=True)


def boolean(name: str, value: Any) -> bool:
    """True or False (not 0, 1 or a string). -> value"""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {_show(value)}")
    return value


def string(name: str, value: Any, *, empty: bool = False) -> str:
    """A str, non-empty unless `empty`. -> value"""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {_show(value)}")
    if not empty and not value:
        raise ValueError(f"{name} must be a non-empty string, got ''")
    return value


def one_of(name: str, value: Any, choices: tuple) -> Any:
    """One of `choices`. -> value"""
    if not isinstance(value, type(choices[0])) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {_show(value)}")
    return value


def position(
    name: str, value: Any, mini_batch_size: int, rows: int | None = None, *, values: bool = True
) -> int | Tensor:
    """A token's index in its mini-batch: an int in [0, mini_batch_size) or, where `rows` is
    given, one index per row, an int32 or int64 tensor [rows]. values=False checks a tensor's
    dtype and shape only, without reading it back from the device. -> value"""
    if not isinstance(value, Tensor):
        return integer(name, value, 0, mini_batch_size - 1)
    if rows is None:
        raise TypeError(f"{name} must be an int here (a position per row needs one token per row), got {_show(value)}")
    if value.dtype not in (torch.int32, torch.int64) or tuple(value.shape) != (rows,):
        raise ValueError(
            f"{name} must be an int or an int32 or int64 tensor [{rows}] (one per row), got {_show(value)}"
        )
    capturing = value.is_cuda and torch.cuda.is_current_stream_capturing()  # nothing can be read back then
    if values and not capturing and bool(((value < 0) | (value >= mini_batch_size)).any()):
        raise ValueError(f"{name} must hold positions in [0, {mini_batch_size}), got {value.tolist()}")
    return value


def tensor(name: str, value: Any, dims: int | None = None) -> Tensor:
    """A torch.Tensor, with `dims` dimensions when given. -> value"""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor, got {_show(value)}")
    return value


def token_ids(
    name: str, ids: Any, vocab_size: int | None = None, dims: int | None = None, *, values: bool = True
) -> Tensor:
    """An integer tensor of token ids, each in [0, vocab_size) (vocab_size None: >= 0). -> ids

    values=False checks the type and dims only, without reading the ids back from the device."""
    tensor(name, ids, dims)
    if ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of token ids (torch.long), got {ids.dtype}")
    if values and ids.numel():
        outside = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
        if outside.any():  # one read from the device where all is well
            bad = int(ids[outside].flatten()[0])
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{name} holds token id {bad}, outside the vocabulary {limit}")
    return ids


def model_vocab_size(model: Any) -> int | None:
    """`model.config.vocab_size` where the model has one, else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def module(name: str, value: Any) -> torch.nn.Module:
    """A torch.nn.Module. -> value"""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value

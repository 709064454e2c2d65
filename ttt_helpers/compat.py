"""The one difference between `transformers` 5.x releases that `ttt_helpers` bridges: the cache's name.

Up to 5.23 a model receives its cache as `past_key_values=` and returns it in `output.past_key_values`;
from 5.24 both are called `cache` (the old name still works there, with a deprecation warning, until 5.40).
Code that passes or reads a cache goes through `CACHE_KEY`, so it runs on every 5.x release without warnings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KEY: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)
CACHE_KEYS = ("cache", "past_key_values")  # the names a caller of a TTT model may use, on any release


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{CACHE_KEY: cache}`: pass a cache to any model as `model(ids, **cache_kwargs(cache))`."""
    return {CACHE_KEY: cache}


def output_cache(output: Any) -> Any:
    """The cache a model returned in `output` (None if it returned none)."""
    return getattr(output, CACHE_KEY, None)


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a forward's keyword arguments, under either name; None if absent.

    Raises a ValueError when both names are given.
    """
    given = {name: kwargs.pop(name) for name in CACHE_KEYS if kwargs.get(name) is not None}
    for name in CACHE_KEYS:
        kwargs.pop(name, None)
    if len(given) > 1:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return next(iter(given.values()), None)

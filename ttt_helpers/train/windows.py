"""Random windows over a corpus: documents joined into one token stream, and batches of windows at
seeded random starts, for training at a long context where documents are shorter than a window.

Unlike `SegmentStream` (one document per row, read in order, the state passed on), every window
starts anywhere in the stream and may cross document boundaries, marked by a separator token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import checks
from ..data.store import Corpus

SEPARATOR = 0  # <|endoftext|> in SmolLM2's vocabulary


def corpus_stream(corpus: Corpus, split: str, kind: str, separator: int = SEPARATOR) -> np.ndarray:
    """The documents of a split ("train", "heldout") and kind ("english", "code") in manifest order,
    each followed by `separator`: [N] int64."""
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a Corpus (data.store.load_corpus), got {type(corpus).__name__}")
    checks.integer("separator", separator, 0)
    parts = []
    for i in corpus.select(split, kind):
        parts += [np.asarray(corpus.document_tokens(i), dtype=np.int64), np.array([separator])]
    if not parts:
        raise ValueError(f"the corpus has no {kind!r} documents in the split {split!r}")
    return np.concatenate(parts)


class RandomWindows:
    """Batches of `rows` windows of `window` tokens of a stream, each at a uniform random start.

    The starts come from one numpy generator seeded with `seed`, so two streams with the same seed
    give the same windows in the same order. tokens: [N] integer ids, N > window.
    """

    def __init__(self, tokens: np.ndarray, window: int, rows: int, *, seed: int = 0) -> None:
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("tokens must be a 1-D numpy array of integer token ids")
        checks.integer("window", window, 1)
        checks.integer("rows", rows, 1)
        checks.integer("seed", seed, 0)
        if tokens.size <= window:
            raise ValueError(f"tokens must hold more than window={window} tokens, got {tokens.size}")
        self.tokens, self.window, self.rows = tokens, window, rows
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> Tensor:
        """The next windows: [rows, window], the dtype of the stream (int64 for `corpus_stream`)."""
        starts = self.rng.integers(0, self.tokens.size - self.window, self.rows)
        return torch.from_numpy(np.stack([self.tokens[s : s + self.window] for s in starts]))

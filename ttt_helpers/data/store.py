"""The corpus on disk: written atomically by `build_corpus`, read and checked by `load_corpus`.

A corpus folder holds
  manifest.json   content hash, token hash, package versions, the rules, sizes, and every document
                  (name, kind, source, unit, split, bytes, tokens) in order, with that table's hash
  tokens.u16      the token ids of all documents, concatenated in manifest order: [T] little-endian uint16
  text.xz         the UTF-8 text of all documents, concatenated in the same order (xz)
  tokens.u16.xz   tokens.u16 compressed (xz): smaller than text.xz, and needs no tokenizer to use
  tokenizer.json  the tokenizer that made tokens.u16
What travels to a machine without the packages is TRANSFER_FILES: `load_corpus` there unpacks the
tokens and checks them against the manifest's token hash. With TEXT_TRANSFER_FILES instead it checks
the text against the content hash, tokenizes it again and checks the token hash.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import file_sha256
from . import code, corpus, tokens

FORMAT = 1
TRANSFER_FILES = ("manifest.json", "tokens.u16.xz")
TEXT_TRANSFER_FILES = ("manifest.json", "tokenizer.json", "text.xz")
CORPUS_FILES = ("manifest.json", "tokens.u16", "text.xz", "tokens.u16.xz", "tokenizer.json")  # all a build writes
XZ_PRESET = 6


MANIFEST_KEYS = ("format", "content_sha256", "tokens_sha256", "tokenizer_sha256", "token_dtype", "sizes", "documents")
DOCUMENT_KEYS = ("name", "kind", "source", "unit", "split", "bytes", "tokens")


def documents_hash(entries: list[dict]) -> str:
    """sha256 of the manifest's document table (names, kinds, sources, units, splits, sizes, in
    order): with the token hash it ties every document boundary and split to the tokens."""
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_out_dir(out_dir, overwrite: bool) -> Path:
    """The output folder as a Path: its parent must exist, and an existing one needs overwrite=True."""
    if not isinstance(out_dir, (str, Path)) or not str(out_dir):
        raise TypeError(f"out_dir must be a folder path, got {out_dir!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    out = Path(out_dir).absolute()
    if not out.parent.is_dir():
        raise ValueError(f"out_dir's parent folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir {out} exists: pass overwrite=True (--overwrite) to replace it")
    if out.exists():
        _check_replaceable(out)
    return out


def _is_temporary(name: str) -> bool:
    """A file `load_corpus` writes while it unpacks tokens (left behind if it was killed)."""
    return name.startswith(".tokens.")


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a folder that is not a corpus: overwrite=True deletes only what a build wrote."""
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [e for e in entries if e not in CORPUS_FILES and not _is_temporary(e)]
    if foreign:
        raise ValueError(
            f"overwrite=True refuses to replace out_dir {out}: it holds {foreign[:5]}, which a corpus build "
            f"does not write (it writes only {list(CORPUS_FILES)}); remove them or choose another out_dir"
        )
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        is_corpus = isinstance(manifest, dict) and "tokens_sha256" in manifest
    except (OSError, ValueError):
        is_corpus = False
    if not is_corpus:
        raise ValueError(
            f"overwrite=True refuses to replace out_dir {out}: it has no corpus manifest.json, so it is not "
            "a corpus folder; remove its files or choose another out_dir"
        )


def _remove_leftovers(out: Path) -> None:
    """Delete the hidden folders that a build into `out` killed part-way left beside it: its
    temporary folder (`.NAME.xxxxxxxx`, corpus files only) or the old corpus it was moving aside
    (`.NAME.old.xxxxxxxx`, holding NAME). Nothing else is touched."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(old\.)?[a-z0-9_]{{8}}")
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        names = [p.name for p in path.iterdir()]
        ours = names == [out.name] if match.group(1) else all(n in CORPUS_FILES for n in names)
        if ours:
            shutil.rmtree(path, ignore_errors=True)


def sizes(entries: list[dict]) -> dict:
    """Documents, bytes and tokens per split (and kind) and per source."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0, "tokens": 0})
    for e in entries:
        for key in (f"{e['split']}/{e['kind']}", f"{e['split']}", f"source/{e['source']}", "total"):
            row = table[key]
            row["documents"] += 1
            row["bytes"] += e["bytes"]
            row["tokens"] += e["tokens"]
    return dict(sorted(table.items()))


def _replace(tmp: Path, out: Path) -> None:
    """Rename the complete folder tmp to out; an old out is moved aside first, then deleted."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def build_corpus(
    out_dir,
    documents: list[corpus.CorpusDocument],
    tokenizer_file,
    *,
    versions: dict[str, str],
    heldout=corpus.HELDOUT,
    overwrite: bool = False,
) -> dict:
    """Split, tokenize and write `documents` to out_dir (atomically: a temporary sibling folder renamed
    when complete). overwrite=True replaces an existing out_dir only if it is a corpus (or empty);
    the hidden folders of a build killed part-way are deleted first. Returns the manifest."""
    out = check_out_dir(out_dir, overwrite)
    corpus.check_corpus_documents(documents)
    if not isinstance(tokenizer_file, (str, Path)) or not Path(tokenizer_file).is_file():
        raise ValueError(f"tokenizer_file must be an existing tokenizer.json, got {tokenizer_file!r}")
    if not isinstance(versions, dict):
        raise TypeError(f"versions must be a dict of package versions, got {type(versions).__name__}")
    start = time.perf_counter()
    kept = corpus.assign_splits(documents, heldout)
    tokenizer = tokens.load_tokenizer(tokenizer_file)
    _remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's folder is private; the corpus is not
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        entries, token_hash = _write_documents(tmp, kept, tokenizer)
        manifest = {
            "format": FORMAT,
            "content_sha256": corpus.content_hash((d.name, d.text) for d, _ in kept),
            "tokens_sha256": token_hash,
            "documents_sha256": documents_hash(entries),
            "tokenizer_sha256": file_sha256(tmp / "tokenizer.json"),
            "token_dtype": "<u2",
            "versions": versions,
            "heldout": {kind: sorted(units) for kind, units in heldout.items()},
            "rules": _rules(),
            "sizes": sizes(entries),
            "build_seconds": round(time.perf_counter() - start, 1),
            "documents": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _rules() -> dict:
    """How the documents were chosen, as the manifest records it."""
    return {
        "code_bytes": [code.MIN_BYTES, code.MAX_BYTES],
        "code_skip_folders": sorted(code.SKIP_FOLDERS),
        "code": "sorted paths; strict UTF-8; newlines as \\n; files naming an install path skipped",
        "duplicates": "a repeated text is dropped; so is a training text equal to a held-out one",
    }


def _write_documents(folder: Path, kept: list[tuple[corpus.CorpusDocument, str]], tokenizer) -> tuple[list[dict], str]:
    """Write the documents' text (text.xz) and token ids (tokens.u16, tokens.u16.xz) into folder, in
    order. -> (the manifest's document entries, the sha256 of the token ids)"""
    entries, token_hash = [], hashlib.sha256()
    texts = [d.text for d, _ in kept]
    with (
        open(folder / "tokens.u16", "wb") as tok,
        lzma.open(folder / "tokens.u16.xz", "wb", preset=XZ_PRESET) as tok_xz,
        lzma.open(folder / "text.xz", "wb", preset=XZ_PRESET) as text_xz,
    ):
        for (doc, split), ids in zip(kept, tokens.encode_documents(tokenizer, texts)):
            raw = doc.text.encode("utf-8")
            text_xz.write(raw)
            for f in (tok, tok_xz):
                f.write(ids.tobytes())
            token_hash.update(ids.tobytes())
            entries.append(
                {"name": doc.name, "kind": doc.kind, "source": doc.source, "unit": doc.unit}
                | {"split": split, "bytes": len(raw), "tokens": int(ids.size)}
            )
    return entries, token_hash.hexdigest()


@dataclass
class Corpus:
    """A loaded corpus: `tokens` [T] uint16 (memory-mapped), `offsets` [D + 1] int64 (document i is
    tokens[offsets[i]:offsets[i + 1]]) and the manifest's document entries."""

    folder: Path
    manifest: dict
    tokens: np.ndarray
    offsets: np.ndarray = field(repr=False)

    @property
    def documents(self) -> list[dict]:
        return self.manifest["documents"]

    def document_tokens(self, i: int) -> np.ndarray:
        """Token ids of document i: [N_i] uint16."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def select(self, split: str | None = None, kind: str | None = None) -> list[int]:
        """Indices of the documents of a split ("train", "heldout") and kind ("english", "code")."""
        return [
            i
            for i, e in enumerate(self.documents)
            if (split is None or e["split"] == split) and (kind is None or e["kind"] == kind)
        ]


def read_texts(folder: Path, manifest: dict) -> list[str]:
    """The documents' texts from text.xz, checked against the manifest's content hash."""
    try:
        raw = lzma.decompress((folder / "text.xz").read_bytes())
    except (lzma.LZMAError, EOFError) as err:
        raise ValueError(f"{folder / 'text.xz'} cannot be decompressed: it is truncated or damaged ({err})") from err
    ends = np.cumsum([e["bytes"] for e in manifest["documents"]])
    if int(ends[-1]) != len(raw):
        raise ValueError(f"{folder / 'text.xz'} holds {len(raw)} bytes, the manifest {int(ends[-1])}")
    texts = [raw[a:b].decode("utf-8") for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    names = [e["name"] for e in manifest["documents"]]
    if corpus.content_hash(zip(names, texts)) != manifest["content_sha256"]:
        raise ValueError(f"{folder / 'text.xz'} does not match the manifest's content hash")
    return texts


def _unpack_tokens(folder: Path, manifest: dict) -> None:
    """Decompress tokens.u16.xz into tokens.u16 (atomically) once its hash matches the manifest's."""
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tokens.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f, lzma.open(folder / "tokens.u16.xz", "rb") as xz:
            try:
                for block in iter(lambda: xz.read(1 << 22), b""):
                    f.write(block)
                    h.update(block)
            except (lzma.LZMAError, EOFError) as err:
                path = folder / "tokens.u16.xz"
                raise ValueError(f"{path} cannot be decompressed: it is truncated or damaged ({err})") from err
        if h.hexdigest() != manifest["tokens_sha256"]:
            raise ValueError(f"{folder / 'tokens.u16.xz'} does not match the manifest's token hash")
        os.replace(tmp, folder / "tokens.u16")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _restore_tokens(folder: Path, manifest: dict) -> None:
    """Tokenize text.xz again with tokenizer.json and write tokens.u16 (atomically) once every
    document's token count and the token hash match the manifest."""
    texts = read_texts(folder, manifest)
    tokenizer = tokens.load_tokenizer(folder / "tokenizer.json")
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tokens.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for entry, ids in zip(manifest["documents"], tokens.encode_documents(tokenizer, texts)):
                if ids.size != entry["tokens"]:
                    raise ValueError(f"{entry['name']}: {ids.size} tokens, the manifest says {entry['tokens']}")
                f.write(ids.tobytes())
                h.update(ids.tobytes())
        if h.hexdigest() != manifest["tokens_sha256"]:
            raise ValueError("the tokens made from text.xz do not match the manifest's token hash")
        os.replace(tmp, folder / "tokens.u16")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_manifest(path: Path) -> dict:
    """A corpus manifest, checked: a JSON object with every key a build writes and a document
    table of objects with theirs. Every error names the file."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): not a corpus manifest") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(manifest).__name__}: not a corpus manifest")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a complete corpus manifest")
    if manifest["token_dtype"] != "<u2" or not isinstance(manifest["sizes"], dict):
        raise ValueError(f"{path}: token_dtype must be '<u2' and sizes an object")
    documents = manifest["documents"]
    if not isinstance(documents, list) or not documents:
        raise ValueError(f"{path}: documents must be a non-empty list")
    for i, e in enumerate(documents):
        complete = isinstance(e, dict) and all(k in e for k in DOCUMENT_KEYS)
        if not complete or not all(type(e[k]) is int and e[k] >= 0 for k in ("bytes", "tokens")):
            raise ValueError(f"{path}: documents[{i}] must be an object with {list(DOCUMENT_KEYS)} (sizes ints >= 0)")
    return manifest


def check_document_table(path: Path, manifest: dict) -> None:
    """Raise unless the manifest's document table is the one its corpus was built with (corpora
    built before the table's hash was recorded have none to compare)."""
    if "documents_sha256" in manifest and documents_hash(manifest["documents"]) != manifest["documents_sha256"]:
        raise ValueError(
            f"{path}: the document table (names, splits, sizes) was changed since the corpus was built: "
            "it does not match the manifest's documents hash"
        )


def load_corpus(folder, *, verify: bool = True) -> Corpus:
    """Open a corpus folder. Where tokens.u16 is missing (only TRANSFER_FILES or TEXT_TRANSFER_FILES
    travelled) it is made from tokens.u16.xz, else from text.xz and tokenizer.json, and checked against
    the manifest's hashes; verify=True also checks an existing tokens.u16."""
    if not isinstance(folder, (str, Path)) or not Path(folder).is_dir():
        raise ValueError(f"folder must be an existing corpus folder, got {folder!r}")
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"{folder} has no manifest.json: not a corpus folder")
    manifest = read_manifest(folder / "manifest.json")
    tokenizer = folder / "tokenizer.json"
    if tokenizer.is_file() and file_sha256(tokenizer) != manifest["tokenizer_sha256"]:
        raise ValueError(f"{tokenizer} is not the tokenizer the manifest names")
    if not (folder / "tokens.u16").is_file():
        if (folder / "tokens.u16.xz").is_file():
            _unpack_tokens(folder, manifest)
        elif (folder / "text.xz").is_file() and tokenizer.is_file():
            _restore_tokens(folder, manifest)
        else:
            raise FileNotFoundError(f"{folder} has neither tokens.u16(.xz) nor text.xz with tokenizer.json")
    elif verify and file_sha256(folder / "tokens.u16") != manifest["tokens_sha256"]:
        raise ValueError(f"{folder / 'tokens.u16'} does not match the manifest's token hash")
    check_document_table(folder / "manifest.json", manifest)  # the tokens match: do the boundaries and splits?
    offsets = np.concatenate([[0], np.cumsum([e["tokens"] for e in manifest["documents"]])]).astype(np.int64)
    ids = np.memmap(folder / "tokens.u16", dtype=manifest["token_dtype"], mode="r")
    if ids.size != offsets[-1]:
        raise ValueError(f"{folder / 'tokens.u16'} holds {ids.size} tokens, the manifest {int(offsets[-1])}")
    return Corpus(folder=folder, manifest=manifest, tokens=ids, offsets=offsets)

"""The distillation's data: training token streams per source, and held-out documents to evaluate on.

`prepare_bank` reads the long-document corpus (`python -m ttt_helpers.data build-corpus`) and the
Python documentation (`data.pydocs`) and writes a folder that travels to a GPU machine on its own
(about 15 MB): one stream of training tokens per source (the documents in a seeded order, each
after an `<|endoftext|>` id), the held-out documents, and `bank.json` with their names, sizes,
hashes and provenance. What is held out never enters a training stream:

* "plays": all 38 of Shakespeare's plays (none is trained on, so the plays test English the
  distillation never saw);
* "code": the corpus's held-out packages (networkx, matplotlib);
* "pydocs": every Python documentation page of at least LONG tokens, and every tenth other page.

The training sources are "kjv" (the Bible's training books), "code" (a seeded sample of the corpus's
training code, `code_tokens` in all), "pydocs" (the other pages) and "chat": conversations in
SmolLM2's chat template made from passages of those training documents (the user asks to continue
a passage, the assistant's turn is its continuation), so the student also learns the teacher where
a chat puts it. `load_bank` opens a folder, checks every stream against its hash, and
`Bank.sample` draws training windows.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .. import checks

if TYPE_CHECKING:
    from ..data.store import Corpus

FORMAT = 1
SEPARATOR = 0  # <|endoftext|> in SmolLM2's vocabulary: what stands between two documents of a stream
LONG = 32_768  # tokens: a document this long takes part in the long-document evaluation
SHORT = 2_048  # tokens: a held-out document this long takes part in the perplexity evaluation
TRAIN_SOURCES = ("kjv", "code", "pydocs", "chat")
# SmolLM2's chat template around one user message, with the system message it adds when none is given
CHAT_BEFORE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
)
CHAT_AFTER = "<|im_end|>\n<|im_start|>assistant\n"
CHAT_END = "<|im_end|>\n"
CHAT_ASKS = {
    "kjv": "Continue this passage from the King James Bible:\n\n",
    "code": "Continue this Python code:\n\n",
    "pydocs": "Continue this passage from the Python documentation:\n\n",
}
CHAT_TURN = (64, 512)  # tokens of the passage in the user's message, and in the assistant's turn: uniform in this range
DOMAINS = ("plays", "code", "pydocs")
MAX_EVAL_DOCS = 128  # per domain: every long document, then a seeded sample of the others


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _stream(documents: list[np.ndarray]) -> np.ndarray:
    """The documents, each after one SEPARATOR id: [sum(N_i + 1)] uint16."""
    parts = []
    for ids in documents:
        parts += [np.array([SEPARATOR], dtype="<u2"), ids.astype("<u2")]
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<u2")


def _write_xz(path: Path, array: np.ndarray) -> None:
    with lzma.open(path, "wb", preset=6) as f:
        f.write(np.ascontiguousarray(array, dtype="<u2").tobytes())


def conversations(
    tokenizer, documents: dict[str, list[tuple[str, np.ndarray]]], count: int, rng: np.random.Generator
) -> list[tuple[str, np.ndarray]]:
    """`count` chat-formatted training sequences: (name, ids [N] uint16). Each takes a training document
    of `documents` ({source in CHAT_ASKS: [(name, ids)]}, a source drawn uniformly, then a document),
    a passage at a uniform start, and writes: the template, the source's request, the passage's first
    part (CHAT_TURN tokens, at most half the document), the assistant's header, the passage's next part,
    the end of the turn."""
    pieces = {
        text: np.asarray(tokenizer.encode(text, add_special_tokens=False).ids)
        for text in (CHAT_BEFORE, CHAT_AFTER, CHAT_END)
    }
    asks = {
        source: np.asarray(tokenizer.encode(ask, add_special_tokens=False).ids) for source, ask in CHAT_ASKS.items()
    }
    lo, hi = CHAT_TURN
    usable = {src: [d for d in docs if d[1].size >= 2 * lo] for src, docs in documents.items() if src in CHAT_ASKS}
    sources = sorted(src for src, docs in usable.items() if docs)
    if count and not sources:
        raise ValueError(f"no training document has the {2 * lo} tokens a conversation needs")
    out = []
    for i in range(count):
        source = sources[int(rng.integers(len(sources)))]
        name, ids = usable[source][int(rng.integers(len(usable[source])))]
        top = min(hi, ids.size // 2)  # a short document gives short turns
        asked, answer = (int(n) for n in rng.integers(lo, top + 1, size=2))
        start = int(rng.integers(0, ids.size - asked - answer + 1))
        passage = ids[start : start + asked + answer]
        parts = [
            pieces[CHAT_BEFORE],
            asks[source],
            passage[:asked],
            pieces[CHAT_AFTER],
            passage[asked:],
            pieces[CHAT_END],
        ]
        out.append((f"chat/{i}:{name}", np.concatenate(parts).astype("<u2")))
    return out


def split_pages(pages: list[tuple[str, np.ndarray]]) -> tuple[list[int], list[int]]:
    """Indices of the Python documentation's training and held-out pages (sorted by name): held out
    are the pages of at least LONG tokens and every tenth other page."""
    heldout, train, others = [], [], 0
    for i, (_, ids) in enumerate(pages):
        if ids.size >= LONG:
            heldout.append(i)
            continue
        (heldout if others % 10 == 5 else train).append(i)
        others += 1
    return train, heldout


def prepare_bank(
    corpus_dir: str | Path,
    pydocs_root: str | Path,
    out_dir: str | Path,
    *,
    code_tokens: int = 16_000_000,
    chats: int = 4_000,
    seed: int = 0,
) -> dict:
    """Write the bank folder `out_dir` (refused if it exists) from a corpus folder and the root
    under which the Python documentation is installed or unpacked; returns bank.json's content."""
    from ..data import pydocs
    from ..data.store import load_corpus
    from ..data.tokens import encode_documents, load_tokenizer

    checks.integer("code_tokens", code_tokens, 1)
    checks.integer("chats", chats, 0)
    checks.integer("seed", seed, 0)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"out_dir {out} exists: choose a new folder (a bank is never overwritten)")
    corpus = load_corpus(corpus_dir)
    pages = pydocs.load_pages(pydocs_root)  # fails here, before anything is written, without the docs
    tokenizer = load_tokenizer(Path(corpus_dir) / "tokenizer.json")
    page_ids = list(encode_documents(tokenizer, [text for _, text in pages]))
    named_pages = [(name, ids) for (name, _), ids in zip(pages, page_ids)]
    rng = np.random.default_rng(seed)
    train, heldout = _split_documents(corpus, named_pages, code_tokens, rng)
    # its own generator, so the other streams and the held-out sample are those of a bank without chats
    train["chat"] = conversations(tokenizer, train, chats, np.random.default_rng([seed, 1]))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        manifest = {"format": FORMAT, "separator": SEPARATOR, "seed": seed, "code_tokens": code_tokens, "chats": chats}
        manifest["sources"] = _write_training_streams(tmp, train, rng)
        manifest["eval"] = _write_eval_stream(tmp, heldout, rng)
        manifest["heldout"] = {domain: [name for name, _ in documents] for domain, documents in heldout.items()}
        manifest["provenance"] = {
            "corpus_content_sha256": corpus.manifest["content_sha256"],
            "corpus_tokens_sha256": corpus.manifest["tokens_sha256"],
            "tokenizer_sha256": corpus.manifest["tokenizer_sha256"],
            "pydocs": {"package": pydocs.PACKAGE, "version": pydocs.version(pydocs_root), "pages": len(pages)},
        }
        (tmp / "bank.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)  # the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


Named = list[tuple[str, np.ndarray]]  # documents as (name, token ids [N])


def _split_documents(
    corpus: Corpus, named_pages: Named, code_tokens: int, rng: np.random.Generator
) -> tuple[dict[str, Named], dict[str, Named]]:
    """The training documents by source (kjv, code: a seeded sample of `code_tokens` tokens, pydocs)
    and the held-out documents by domain (plays, code, pydocs)."""
    docs = corpus.documents

    def corpus_docs(indices: list[int]) -> Named:
        return [(docs[i]["name"], np.asarray(corpus.document_tokens(i))) for i in indices]

    kjv = [i for i in corpus.select("train", "english") if docs[i]["name"].startswith("kjv/")]
    code = [int(i) for i in rng.permutation(corpus.select("train", "code"))]
    taken, total = [], 0
    for i in code:
        if total >= code_tokens:
            break
        taken.append(i)
        total += docs[i]["tokens"]
    page_train, page_heldout = split_pages(named_pages)
    train = {
        "kjv": corpus_docs(kjv),
        "code": corpus_docs(taken),
        "pydocs": [named_pages[i] for i in page_train],
    }
    plays = [i for i in range(len(docs)) if docs[i]["name"].startswith("shakespeare/")]
    heldout = {
        "plays": corpus_docs(plays),
        "code": corpus_docs(corpus.select("heldout", "code")),
        "pydocs": [named_pages[i] for i in page_heldout],
    }
    return train, heldout


def _write_training_streams(folder: Path, train: dict[str, Named], rng: np.random.Generator) -> dict[str, dict]:
    """One stream per source, its documents in a seeded order, written as `train-<source>.u16.xz`.
    -> bank.json's "sources": {source: file, tokens, sha256, document names in order}"""
    sources = {}
    for name, documents in train.items():
        # the conversations come in a random order already; drawing none keeps the held-out sample
        order = np.arange(len(documents)) if name == "chat" else rng.permutation(len(documents))
        stream = _stream([documents[i][1] for i in order])
        _write_xz(folder / f"train-{name}.u16.xz", stream)
        sources[name] = {
            "file": f"train-{name}.u16.xz",
            "tokens": int(stream.size),
            "sha256": _sha256(stream),
            "documents": [documents[i][0] for i in order],
        }
    return sources


def _write_eval_stream(folder: Path, heldout: dict[str, Named], rng: np.random.Generator) -> dict:
    """The held-out documents of at least SHORT tokens, per domain every long one and a seeded sample
    of the others (MAX_EVAL_DOCS in all), concatenated into `eval.u16.xz`.
    -> bank.json's "eval": file, sha256, and each document's name, domain, offset and tokens"""
    evaluation, parts, offset = [], [], 0
    for domain, documents in heldout.items():
        documents = [d for d in documents if d[1].size >= SHORT]
        long = [d for d in documents if d[1].size >= LONG]
        rest = [d for d in documents if d[1].size < LONG]
        keep = max(0, MAX_EVAL_DOCS - len(long))
        rest = [rest[i] for i in sorted(rng.permutation(len(rest))[:keep])]
        for name, ids in long + rest:
            evaluation.append({"name": name, "domain": domain, "offset": offset, "tokens": int(ids.size)})
            parts.append(ids.astype("<u2"))
            offset += ids.size
    eval_stream = np.concatenate(parts) if parts else np.zeros(0, dtype="<u2")
    _write_xz(folder / "eval.u16.xz", eval_stream)
    return {"file": "eval.u16.xz", "sha256": _sha256(eval_stream), "documents": evaluation}


def _read_stream(folder: Path, entry: dict) -> np.ndarray:
    """A stream of the bank (from its .u16 file where unpacked, else its .xz), checked against its hash."""
    raw = folder / entry["file"].removesuffix(".xz")
    data = raw.read_bytes() if raw.is_file() else lzma.decompress((folder / entry["file"]).read_bytes())
    array = np.frombuffer(data, dtype="<u2")
    if _sha256(array) != entry["sha256"]:
        raise ValueError(f"{folder / entry['file']} does not match the hash in bank.json")
    return array


@dataclass
class Bank:
    """An opened bank: `streams` {source: [N] uint16}, `eval_tokens` [M] uint16, `manifest` (bank.json)."""

    folder: Path
    manifest: dict
    streams: dict[str, np.ndarray]
    eval_tokens: np.ndarray

    def sample(self, rng: np.random.Generator, batch_size: int, seq_len: int, weights: dict[str, float]) -> Tensor:
        """`batch_size` windows of `seq_len` tokens, each from a source drawn with `weights` (summing to
        1) at a uniform start: int64 [B, T]. A window may span a document boundary (the separator)."""
        names = sorted(weights)
        p = np.array([weights[n] for n in names], dtype=np.float64)
        rows = []
        for source in rng.choice(len(names), size=batch_size, p=p / p.sum()):
            stream = self.streams[names[source]]
            start = int(rng.integers(0, stream.size - seq_len + 1))
            rows.append(stream[start : start + seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows))

    def eval_documents(self, domain: str, min_tokens: int = 0) -> list[tuple[str, np.ndarray]]:
        """(name, ids [N] uint16) of the held-out documents of `domain` with at least `min_tokens` tokens."""
        checks.one_of("domain", domain, DOMAINS)
        return [
            (d["name"], self.eval_tokens[d["offset"] : d["offset"] + d["tokens"]])
            for d in self.manifest["eval"]["documents"]
            if d["domain"] == domain and d["tokens"] >= min_tokens
        ]


def load_bank(folder: str | Path) -> Bank:
    """Open a bank folder written by `prepare_bank`, checking every stream against bank.json."""
    folder = Path(folder)
    if not (folder / "bank.json").is_file():
        raise FileNotFoundError(f"{folder} has no bank.json: not a distillation bank (see prepare_bank)")
    manifest = json.loads((folder / "bank.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / 'bank.json'} has format {manifest.get('format')!r}, expected {FORMAT}")
    streams = {name: _read_stream(folder, entry) for name, entry in manifest["sources"].items()}
    return Bank(folder, manifest, streams, _read_stream(folder, manifest["eval"]))

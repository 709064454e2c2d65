"""What the long-context experiment's text looks like from a token's point of view (CPU, seconds).

    python -m benchmarks.long_context_corpus --corpus corpus/ --out benchmarks/results/long_context_corpus.json

Reads the document table of a corpus folder (`python -m ttt_helpers.data build-corpus`) and lays the
documents out as `train_long.py` does: each split and kind in manifest order, a separator token after
every document, training English then code. It records how much of the training text is code, how
long the code files are, how much of its own document a training token has before it, and, for the
evaluation windows `train_long.py` reads (the first 24 windows of 32,768 tokens of each held-out
stream, as many as it holds), how many documents each window spans and how much of its own document
a token at a given index has before it. The rest of the window is other documents.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
from pathlib import Path

import numpy as np

from benchmarks.kernel_bench.timing import command_line
from ttt_helpers.data.store import read_manifest

ROOT = Path(__file__).resolve().parents[1]

EVAL_LENGTH, EVAL_WINDOWS = 4 * 8192, 24  # train_long.py's evaluation at a context of 8,192
MARKS = (1024, 2048, 4096, 8192)
INDEX_RANGES = ((1024, 2048), (2048, 4096), (4096, 8192), (8192, 16384), (16384, EVAL_LENGTH))


def lengths(manifest: dict, split: str, kind: str) -> np.ndarray:
    """Tokens of each document of a split and kind, in manifest order, its separator included."""
    docs = manifest["documents"]
    return np.array([d["tokens"] + 1 for d in docs if d["split"] == split and d["kind"] == kind], dtype=np.int64)


def training(manifest: dict) -> dict:
    """The training stream: its tokens by kind, its code files' lengths, and how much of its own
    document a training token has before it."""
    english, code = lengths(manifest, "train", "english"), lengths(manifest, "train", "code")
    every = np.concatenate([english, code])
    total = int(every.sum())
    files = code - 1
    return {
        "tokens": {"english": int(english.sum()), "code": int(code.sum()), "total": total},
        "code_share": float(code.sum() / total),
        "code_files": {
            "count": int(files.size),
            "median_tokens": float(np.median(files)),
            "share_shorter_than": {str(k): float(np.mean(files < k)) for k in MARKS},
            "token_share_in_files_shorter_than": {str(k): float(files[files < k].sum() / files.sum()) for k in MARKS},
        },
        # a token at offset d of its document has d tokens of it before; min(L, k) of a document's L have d < k
        "token_share_within_first": {str(k): float(np.minimum(every, k).sum() / total) for k in MARKS},
    }


def evaluation_windows(manifest: dict, kind: str) -> dict:
    """The documents each evaluation window spans, and the share of tokens at each index range whose
    own document began fewer than 2,048 tokens earlier (with the median of that distance)."""
    sizes = lengths(manifest, "heldout", kind)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n = min(EVAL_WINDOWS, int(sizes.sum()) // EVAL_LENGTH)
    spans, own = [], []
    for w in range(n):
        a, b = w * EVAL_LENGTH, (w + 1) * EVAL_LENGTH
        spans.append(int(((starts < b) & (starts + sizes > a)).sum()))
        position = np.arange(a, b)
        own.append(position - starts[np.searchsorted(starts, position, side="right") - 1])
    own = np.stack(own)  # [windows, EVAL_LENGTH]: tokens of the token's own document before it
    ranges = {}
    for lo, hi in INDEX_RANGES:
        part = own[:, lo:hi]
        ranges[f"{lo}-{hi}"] = {
            "share_own_document_under_2048": float(np.mean(part < 2048)),
            "median_own_document_tokens": float(np.median(part)),
        }
    return {"windows": n, "documents_per_window": spans, "by_index": ranges}


def git(*args: str) -> str | None:
    """The output of a git command in the repository, or None where git or the repository is missing."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, type=Path, help="a corpus folder (its manifest.json is read)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    manifest = read_manifest(args.corpus / "manifest.json")
    result = {
        "what": "the long-context corpus laid out as benchmarks/train_long.py reads it",
        "corpus": {k: manifest[k] for k in ("content_sha256", "tokens_sha256", "versions")},
        "eval_length": EVAL_LENGTH,
        "train": training(manifest),
        "heldout": {kind: evaluation_windows(manifest, kind) for kind in ("english", "code")},
        "provenance": {
            "command": command_line(),
            "git_commit": git("rev-parse", "HEAD"),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("train", "heldout")}, indent=1))


if __name__ == "__main__":
    main()

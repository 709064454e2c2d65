"""Command line: `python -m ttt_helpers.data build-corpus OUT_DIR` and `load-corpus FOLDER`.

build-corpus collects, splits and tokenizes the whole corpus (needs the packages of the lock);
load-corpus opens a folder (making tokens.u16 from the text where only the transfer files came) and
checks it. Both print the sizes per split, kind and source, and the time taken.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import code, corpus, store, tokens


def print_sizes(manifest: dict, seconds: float) -> None:
    """The manifest's sizes as a table, then the hashes and the time."""
    print(f"{'':24} {'documents':>10} {'MB':>9} {'M tokens':>9} {'bytes/token':>12}")
    for key, row in manifest["sizes"].items():
        per = row["bytes"] / max(row["tokens"], 1)
        print(f"{key:24} {row['documents']:>10} {row['bytes'] / 1e6:>9.2f} {row['tokens'] / 1e6:>9.3f} {per:>12.2f}")
    print(f"content sha256 {manifest['content_sha256']}")
    print(f"tokens  sha256 {manifest['tokens_sha256']}")
    print(f"took {seconds:.1f} s")


def build(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = store.check_out_dir(args.out_dir, args.overwrite)  # refuse before any work
    documents, versions = corpus.collect_documents(args.packages, args.max_docs_per_source)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = tokens.save_smollm2_tokenizer(Path(tmp) / "tokenizer.json")
        manifest = store.build_corpus(out, documents, tokenizer_file, versions=versions, overwrite=args.overwrite)
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for files in (store.TRANSFER_FILES, store.TEXT_TRANSFER_FILES):
        sent = sum((out / name).stat().st_size for name in files)
        print(f"transfer {' + '.join(files)}: {sent / 2**20:.1f} MiB")
    print_sizes(manifest, time.perf_counter() - start)


def load(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    loaded = store.load_corpus(args.folder)
    print(f"{loaded.folder}: {len(loaded.documents)} documents, {loaded.tokens.size} tokens, hashes match")
    print_sizes(loaded.manifest, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_helpers.data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build-corpus", help="build the corpus into a new folder")
    b.add_argument("out_dir", help="the folder to write (refused if it exists, unless --overwrite)")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing corpus in out_dir (a folder with other files is refused)",
    )
    b.add_argument(
        "--packages",
        nargs="+",
        choices=sorted(code.CODE_PACKAGES),
        default=list(code.CODE_PACKAGES),
        help="packages whose code is included (default: all)",
    )
    b.add_argument("--max-docs-per-source", type=int, default=None, help="keep the first N documents of each source")
    b.set_defaults(run=build)
    lo = commands.add_parser("load-corpus", help="open and check a corpus folder")
    lo.add_argument("folder")
    lo.set_defaults(run=load)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

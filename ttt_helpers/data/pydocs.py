"""Modern English prose: the Python documentation, one document per page.

Debian's package `python3.11-doc` ships the reStructuredText sources of every page of the Python
3.11 documentation (tutorial, library and language reference, how-tos, what's new) as
`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`: about 500 pages and 3M SmolLM2 tokens of
technical English written in the 2000s to 2020s, under the PSF licence. Install it with
`apt-get install python3.11-doc`, or unpack its .deb anywhere (`apt-get download python3.11-doc`,
`dpkg -x python3.11-doc_*.deb DIR`) and pass DIR.
"""

from __future__ import annotations

from pathlib import Path

from .code import normalise

PACKAGE = "python3.11-doc"
SOURCES = Path("usr/share/doc/python3.11/html/_sources")
INSTALL_HINT = f"apt-get install {PACKAGE} (or apt-get download {PACKAGE} and dpkg -x it into a folder)"
MIN_BYTES = 2_000  # smaller pages are tables of contents and stubs


def sources_folder(root: str | Path = "/") -> Path:
    """The folder of .rst.txt pages under `root` (/ for an installed package, or an unpacked .deb)."""
    folder = Path(root) / SOURCES
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: the Python documentation comes from {INSTALL_HINT}")
    return folder


def version(root: str | Path = "/") -> str:
    """The documentation's Debian package version, read from its changelog's first line where present."""
    changelog = Path(root) / "usr/share/doc/python3.11-doc/changelog.Debian.gz"
    if not changelog.is_file():
        return "unknown"
    import gzip

    first = gzip.decompress(changelog.read_bytes()).decode("utf-8", "replace").split("\n", 1)[0]
    return first.split("(", 1)[1].split(")", 1)[0] if "(" in first else "unknown"


def load_pages(root: str | Path = "/") -> list[tuple[str, str]]:
    """(name, text) of every page of at least MIN_BYTES, sorted by path: name is
    `pydocs/<path without .rst.txt>`, text strict UTF-8 with `\\n` newlines."""
    folder = sources_folder(root)
    pages = []
    for path in sorted(folder.rglob("*.rst.txt")):
        raw = path.read_bytes()
        text = normalise(raw)
        if text is None or len(raw) < MIN_BYTES:
            continue
        pages.append(("pydocs/" + path.relative_to(folder).as_posix().removesuffix(".rst.txt"), text))
    if not pages:
        raise ValueError(f"{folder} holds no page of the Python documentation")
    return pages

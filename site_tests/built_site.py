"""Where the built site is and which of its files are pages."""

from __future__ import annotations

from pathlib import Path

SITE = Path(__file__).resolve().parent.parent / "_build" / "html"


def site_pages() -> list[str]:
    """Every html page of the built site, as a path relative to its root ('book/intro.html').

    Sphinx keeps copied assets in folders whose names start with `_` (`_static` holds template
    fragments such as `webpack-macros.html`, not pages), so those are left out. Everything else,
    `search.html` and `genindex.html` included, is a page a reader can reach.
    """
    return sorted(
        p.relative_to(SITE).as_posix() for p in SITE.rglob("*.html") if not p.relative_to(SITE).parts[0].startswith("_")
    )

"""Offline check of the built site: every link that points inside the site resolves (no browser)."""

from __future__ import annotations

import functools
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from built_site import SITE

# Attributes that name another file: <a href>, <link href>, <img src>, <script src>, ...
LINK_ATTRS = {"href", "src"}


class _PageParser(HTMLParser):
    """Collects the element ids of one page and the links it makes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)
            elif name in LINK_ATTRS:
                self.links.append(value)


@functools.cache
def parse(path: Path) -> _PageParser:
    """Parse one html file of the site once, however many pages link to it."""
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_link(page: Path, link: str) -> str | None:
    """Why `link`, found on `page`, does not resolve inside the site; None when it does or is external."""
    parts = urlsplit(link)
    if parts.scheme or parts.netloc:  # http:, mailto:, data:, //cdn...: not part of the site
        return None
    target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
    if target.is_dir():
        target = target / "index.html"
    if not target.is_relative_to(SITE):
        return f"{link!r} points outside the site"
    if not target.is_file():
        return f"{link!r}: no file {target.relative_to(SITE)}"
    fragment = unquote(parts.fragment)
    if fragment and target.suffix == ".html" and fragment not in parse(target).ids:
        return f"{link!r}: no id {fragment!r} in {target.relative_to(SITE)}"
    return None


def test_internal_links_resolve(page: str) -> None:
    """Every relative href/src of the page names an existing file, and its #fragment an existing id."""
    path = SITE / page
    problems = sorted({why for link in parse(path).links if (why := broken_link(path, link))})
    assert not problems, f"{page}: {len(problems)} broken internal link(s):\n" + "\n".join(problems)

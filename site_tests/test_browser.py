"""Every page of the built site in headless Chromium: it loads cleanly, its navigation works, and
chapter pages show their figures and no error output. A full-page screenshot of each page is saved
under `_build/screenshots/`."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from built_site import SITE
from playwright.sync_api import Browser, ConsoleMessage, Error, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package `chromium`; Playwright never downloads one
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = SITE.parent / "screenshots"

# Errors that the book's toolchain (Jupyter Book 1.x and its themes) puts on every page, whatever
# the content, matched in full so that any other error still fails:
KNOWN_TOOLCHAIN_ERRORS = {
    # sphinx-thebe's inline config script is emitted twice in <head>; the second copy's
    # `const` re-declaration throws and is skipped, the first copy already did the work.
    "Identifier 'THEBE_JS_URL' has already been declared",
    # pydata-sphinx-theme logs this once per fresh browser profile (no stored light/dark mode)
    # and then falls back to "auto", the mode it would have used anyway.
    "Got invalid theme mode: . Resetting to auto.",
}

# The links a reader navigates by: the table of contents in the left sidebar and the
# previous/next buttons at the bottom of each page.
NAV_LINKS_JS = """() => [...document.querySelectorAll('.bd-sidebar-primary a[href], .prev-next-area a[href]')]
    .map(a => a.href).filter(href => href.startsWith(location.origin))"""
# Widths of the images inside notebook output cells (0 when an image failed to load or decode).
FIGURES_JS = "() => [...document.querySelectorAll('.cell_output img')].map(img => img.naturalWidth)"
OUTPUTS_JS = "() => [...document.querySelectorAll('.cell_output')].map(cell => cell.innerText)"


@dataclass
class Visit:
    """What one page showed in the browser."""

    status: int | None
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    nav_links: list[str] = field(default_factory=list)  # absolute URLs on the local server
    figure_widths: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # text of each notebook output cell


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright; skipped (failed on CI) where it is not installed."""
    if not CHROMIUM.is_file():
        reason = (
            f"no Chromium at {CHROMIUM}: the browser test needs Debian's `chromium` package "
            "(`make site` installs it when run as root with apt-get)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def visit(browser: Browser, server: str) -> Callable[[str], Visit]:
    """Open a page (once, however many tests ask) and record what it showed."""

    def record(errors: list[str], text: str, where: str) -> None:
        if text not in KNOWN_TOOLCHAIN_ERRORS:
            errors.append(f"{text} ({where})")

    def on_console(errors: list[str], message: ConsoleMessage) -> None:
        source = message.location.get("url", "")
        # Requests that leave the site (CDN scripts such as MathJax) are blocked below, so that the
        # test is the same with or without internet; the errors of those blocked loads are skipped.
        off_site = source.startswith(("http:", "https:")) and not source.startswith(server)
        if message.type == "error" and not off_site:
            record(errors, message.text, f"console error from {source}")

    @cache
    def open_page(page: str) -> Visit:
        tab = browser.new_page()
        errors: list[str] = []
        tab.on("console", lambda message: on_console(errors, message))
        tab.on("pageerror", lambda error: record(errors, error.message, f"uncaught {error.name}"))
        tab.route(lambda url: not url.startswith(server), lambda route: route.abort())
        try:
            response = tab.goto(server + page)
            # Also lets the redirect of index.html land on the page it points to.
            tab.wait_for_load_state("networkidle")
            result = Visit(
                status=response.status if response else None,
                errors=errors,
                nav_links=tab.evaluate(NAV_LINKS_JS),
                figure_widths=tab.evaluate(FIGURES_JS),
                outputs=tab.evaluate(OUTPUTS_JS),
            )
            shot = SCREENSHOTS / Path(page).with_suffix(".png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=shot, full_page=True)
        except Error as error:
            pytest.fail(f"{page}: the browser failed on it: {error}")
        finally:
            tab.close()
        return result

    return open_page


@cache
def http_status(url: str) -> int:
    """The status the local server answers for `url` (its #fragment dropped)."""
    try:
        with urllib.request.urlopen(url.split("#", 1)[0], timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_page_loads_without_errors(page: str, visit: Callable[[str], Visit]) -> None:
    """The page answers 200 and logs no console error and throws no uncaught exception."""
    status, errors = visit(page).status, visit(page).errors
    assert status == 200, f"{page}: HTTP status {status}"
    assert not errors, f"{page}: {len(errors)} browser error(s):\n" + "\n".join(errors)
    assert (SCREENSHOTS / Path(page).with_suffix(".png")).is_file(), f"{page}: no screenshot saved"


def test_navigation_links_resolve(page: str, visit: Callable[[str], Visit]) -> None:
    """Every table-of-contents and previous/next link of the page answers 200."""
    links = visit(page).nav_links
    broken = sorted({f"{url} -> HTTP {code}" for url in links if (code := http_status(url)) != 200})
    assert not broken, f"{page}: broken navigation link(s):\n" + "\n".join(broken)


def test_chapter_shows_a_figure(chapter: str, visit: Callable[[str], Visit]) -> None:
    """A chapter shows at least one figure among its outputs, and every such figure rendered."""
    widths = visit(chapter).figure_widths
    assert widths, f"{chapter}: no figure in the notebook's outputs"
    assert all(widths), f"{chapter}: {widths.count(0)} of {len(widths)} output figure(s) did not render"


def test_no_error_in_outputs(page: str, visit: Callable[[str], Visit]) -> None:
    """No notebook output cell on the page shows a traceback or an error."""
    outputs = visit(page).outputs
    bad = [text for text in outputs if "Traceback" in text or "Error" in text]
    assert not bad, f"{page}: {len(bad)} output cell(s) show an error; the first:\n{bad[0][:2000]}"

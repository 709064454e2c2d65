"""Shared setup for the tests of the built site in `_build/html` (run them with `make site`)."""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from built_site import SITE, site_pages


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once, with the fix, when there is no built site to test."""
    if not (SITE / "index.html").is_file():
        raise pytest.UsageError(f"no built site at {SITE}: run `make book` first")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test that takes `page` once per page of the site, one that takes `chapter` once per
    chapter (a page built from a notebook, under `notebooks/`)."""
    if "page" in metafunc.fixturenames:
        metafunc.parametrize("page", site_pages())
    if "chapter" in metafunc.fixturenames:
        metafunc.parametrize("chapter", [p for p in site_pages() if p.startswith("notebooks/")])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site folder without logging every request to stderr."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    """A threaded server that ignores a browser closing its connection early (e.g. on /favicon.ico)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    """Serve `_build/html` on a free localhost port in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()

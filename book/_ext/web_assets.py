"""The site's own copies of MathJax, require.js and the ipywidgets manager, so that it reads offline.

Run as a script (`make book` does) it fetches the npm packages of `web-assets.lock` with `npm pack`,
checks each tarball against its sha512 integrity and copies the listed files into
`_build/web-assets/static`. As a Sphinx extension (`_config.yml`) it serves that folder and
`book/_static` as static files, adds the book's stylesheet, and drops the repeated inline scripts
that Sphinx emits when an extension registers one after the builder has started.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "web-assets.lock"
ASSETS = ROOT / "_build" / "web-assets"
STATIC = ASSETS / "static"
BOOK_STATIC = ROOT / "book" / "_static"


class Asset(NamedTuple):
    """One line of the lock: a path inside an npm package's tarball and where it goes under _static."""

    spec: str  # <package>@<version>
    integrity: str  # sha512-<base64>, as npm's registry gives it
    source: str  # a file or folder inside the tarball's `package/`
    target: str  # its path under _static


def read_lock(lock: Path = LOCK) -> list[Asset]:
    """The assets of the lock file, in its order."""
    assets = []
    for number, line in enumerate(lock.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            fields = line.split()
            if len(fields) != 4 or not fields[1].startswith("sha512-"):
                raise ValueError(f"{lock.name}:{number}: expected '<package>@<version> sha512-... <source> <target>'")
            assets.append(Asset(*fields))
    return assets


def sha512_integrity(path: Path) -> str:
    """The integrity string npm records for a tarball: 'sha512-' and the base64 of its SHA-512."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def npm_pack(spec: str, folder: Path) -> Path:
    """Download the tarball of one exact package version from the npm registry into `folder`."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is missing: it fetches the site's MathJax and widget scripts (apt-get install npm)")
    result = subprocess.run(
        [npm, "pack", spec, "--json", "--pack-destination", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    return folder / json.loads(result.stdout)[0]["filename"]


def fetch(assets: list[Asset], static: Path = STATIC) -> None:
    """Fetch, check and unpack every asset into `static`, which is replaced only once all of them passed."""
    final, static = static, static.with_name(static.name + ".new")
    if static.exists():
        shutil.rmtree(static)
    static.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarballs: dict[str, Path] = {}
        for asset in assets:
            if asset.spec not in tarballs:
                tarball = npm_pack(asset.spec, Path(tmp))
                if (found := sha512_integrity(tarball)) != asset.integrity:
                    raise SystemExit(f"{asset.spec}: integrity {found} is not the {asset.integrity} of {LOCK.name}")
                unpacked = Path(tmp) / tarball.stem
                with tarfile.open(tarball) as archive:
                    if hasattr(tarfile, "data_filter"):  # Python 3.11.4 on: refuse paths that leave `unpacked`
                        archive.extractall(unpacked, filter="data")
                    else:
                        archive.extractall(unpacked)
                tarballs[asset.spec] = unpacked / "package"
            package = tarballs[asset.spec]
            source, target = package / asset.source, static / asset.target
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.map"))
                licence_folder = target
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
                licence_folder = target.parent
            if (package / "LICENSE").is_file():
                shutil.copy2(package / "LICENSE", licence_folder / "LICENSE")
            print(f"{asset.spec} ({asset.integrity[:19]}...): {asset.source} -> _static/{asset.target}")
    if final.exists():
        shutil.rmtree(final)
    static.rename(final)


def _serve_static(app: Any) -> None:
    """Serve the fetched assets and the book's own static files; fail early when the assets are missing."""
    missing = [a.target for a in read_lock() if not (STATIC / a.target).exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing under {STATIC}: run `make book` (it fetches them)")
    app.config.html_static_path.extend([str(STATIC), str(BOOK_STATIC)])
    app.add_css_file("book.css")


def _drop_repeated_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Keep the first of scripts that differ only in their empty name (None or '').

    An inline script registered during the build (sphinx-thebe's configuration, whose `const`s then
    throw when declared twice) reaches the builder both directly, named None, and through the
    registry, named ''; Sphinx's own check for duplicates sees two different scripts.
    """
    seen, kept = set(), []
    for script in context.get("script_files", []):
        key = (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"][:] = kept  # the builder's own list, which it restores after each page


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _serve_static)
    app.connect("html-page-context", _drop_repeated_scripts, priority=900)  # after myst-nb's page scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    fetch(read_lock(Path(sys.argv[1]) if len(sys.argv) > 1 else LOCK))

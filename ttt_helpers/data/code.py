"""Python source code as documents: one document per `.py` file of an installed package.

The files are read in sorted order of their path inside the package, decoded as strict UTF-8 with
newlines normalised to `\\n`, and named `<package>/<path>`, so the documents do not depend on where
the package is installed. Which files are kept is a fixed rule (`keep_reason`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
import sysconfig
from pathlib import Path

# package -> (import name, distribution name); "python" is the standard library of the running Python
CODE_PACKAGES = {
    "python": ("", ""),
    "torch": ("torch", "torch"),
    "transformers": ("transformers", "transformers"),
    "sympy": ("sympy", "sympy"),
    "numpy": ("numpy", "numpy"),
    "networkx": ("networkx", "networkx"),
    "matplotlib": ("matplotlib", "matplotlib"),
}
MIN_BYTES = 256  # smaller files are mostly empty __init__.py files and one-line re-exports
MAX_BYTES = 1_000_000  # larger files are generated tables, not code people write
SKIP_FOLDERS = frozenset({"test", "tests", "__pycache__", "site-packages", "dist-packages"})


def package_root(package: str) -> Path:
    """The folder of an installed package of CODE_PACKAGES ("python": the standard library)."""
    if package not in CODE_PACKAGES:
        raise ValueError(f"package must be one of {sorted(CODE_PACKAGES)}, got {package!r}")
    if package == "python":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(CODE_PACKAGES[package][0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(package: str) -> str:
    """The installed version of a package of CODE_PACKAGES ("python": the interpreter's version)."""
    if package == "python":
        return f"{platform.python_implementation()} {platform.python_version()}"
    return importlib.metadata.version(CODE_PACKAGES[package][1])


def machine_paths() -> tuple[str, ...]:
    """Install locations of this machine (of three folders or more, so never a bare `/usr`): a file
    that contains one of them was written at install time and is machine-specific."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
    return tuple(sorted(p for p in paths if len(Path(p).parts) >= 4))


def normalise(raw: bytes) -> str | None:
    """Strict UTF-8 with newlines as `\\n` and no byte-order mark; None where it does not decode."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def keep_reason(relative: Path, raw: bytes, text: str | None, forbidden: tuple[str, ...]) -> str | None:
    """Why a file is skipped (None: it is kept). The rule: no file inside a test, tests,
    __pycache__ or site-packages folder; MIN_BYTES <= size <= MAX_BYTES; strict UTF-8; no
    install path of this machine in its text."""
    if SKIP_FOLDERS & set(relative.parts[:-1]):
        return "folder"
    if not MIN_BYTES <= len(raw) <= MAX_BYTES:
        return "size"
    if text is None:
        return "encoding"
    if any(path in text for path in forbidden):
        return "machine path"
    return None


def source_files(package: str, root: Path) -> list[tuple[str, str]]:
    """(name, text) of every kept `.py` file under root, sorted by path; name is `<package>/<path>`."""
    if not isinstance(root, Path) or not root.is_dir():
        raise ValueError(f"root must be an existing folder, got {root!r}")
    forbidden = machine_paths() + (str(root),)
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py") if p.is_file())
    kept = []
    for relative, path in files:
        raw = path.read_bytes()
        text = normalise(raw)
        if keep_reason(Path(relative), raw, text, forbidden) is None:
            kept.append((f"{package}/{relative}", text))
    return kept

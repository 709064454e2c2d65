"""The stored outputs of the chapters stay small and portable: no text output over 1 MB per
notebook (figures aside), no absolute local paths, no error outputs, and every chapter is in
the book's table of contents; the Colab cell of each pins the locked versions."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LOCAL_PATH = re.compile(r"(/home/|/Users/|/root/|/tmp/|/work/|[A-Z]:\\\\Users)")


def text_outputs(nb: dict) -> list[str]:
    texts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append("".join(out["text"]))
            for mime, data in out.get("data", {}).items():
                if not mime.startswith("image/"):
                    texts.append(data if isinstance(data, str) else "".join(data))
    return texts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_outputs_are_small_and_portable(path):
    nb = json.loads(path.read_text())
    texts = text_outputs(nb)
    size = sum(len(t.encode()) for t in texts)
    assert size < 1_000_000, f"{path.name}: {size:,} bytes of text outputs (limit 1 MB)"
    for t in texts:
        match = LOCAL_PATH.search(t)
        assert match is None, (
            f"{path.name}: an output shows a local path near {t[max(0, match.start() - 40) :][:120]!r}"
        )
    errors = [out for cell in nb["cells"] for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: stored error output {errors[0].get('ename')}"


def test_every_chapter_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}" not in toc]
    assert not missing, f"notebooks missing from _toc.yml: {missing}"


def locked_versions() -> dict[str, str]:
    """{package: version} pinned by requirements.lock."""
    lock = (ROOT / "requirements.lock").read_text()
    return dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock, flags=re.M))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_colab_cell_installs_the_locked_versions(path):
    """The first code cell pins in Colab the versions the book is tested with (`make lock` moves them)."""
    cell = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    source = "".join(cell["source"])
    assert "google.colab" in source, f"{path.name}: the first code cell is not the Colab cell"
    pins = dict(re.findall(r'"([a-z0-9-]+)==([^"]+)"', source))
    locked = locked_versions()
    for name in ("transformers", "peft"):
        assert pins.get(name) == locked[name], (
            f"{path.name}: Colab pins {name}=={pins.get(name)}, the lock {locked[name]}"
        )

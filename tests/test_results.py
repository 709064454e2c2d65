"""Stored benchmark results: read from the checkout, else downloaded, with clear errors."""

import io
import json
import urllib.error

import pytest

from ttt_helpers import results


def test_reads_the_checkouts_file():
    folder = results.results_dir()
    assert folder is not None and folder.name == "results"
    name = sorted(p.name for p in folder.glob("*.json"))[0]
    assert results.load_result(name) == json.loads((folder / name).read_text())


def test_a_missing_result_lists_the_stored_ones():
    with pytest.raises(FileNotFoundError, match="lora_recall_cpu.json"):
        results.load_result("no_such_result.json")


@pytest.mark.parametrize("name", ["../pyproject.toml", "results/x.json", "x.txt", ""])
def test_bad_names(name):
    with pytest.raises(ValueError, match="name must"):
        results.load_result(name)


def test_downloads_without_a_checkout(monkeypatch):
    monkeypatch.setattr(results, "results_dir", lambda: None)
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO(b'{"a": 1}')

    monkeypatch.setattr(results.urllib.request, "urlopen", urlopen)
    assert results.load_result("x.json") == {"a": 1}
    assert asked == [results.RESULTS_URL + "x.json"]


def test_a_failed_download_says_where_the_file_is(monkeypatch):
    monkeypatch.setattr(results, "results_dir", lambda: None)

    def urlopen(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(results.urllib.request, "urlopen", urlopen)
    with pytest.raises(RuntimeError, match="could not be downloaded.*Clone"):
        results.load_result("x.json")

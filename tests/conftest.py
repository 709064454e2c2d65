import logging
import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; the variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allow-deprecations",
        action="store_true",
        help="let deprecation warnings pass (for older releases than the lock's, which warn about their own calls)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # A deprecation warning announces a break in a later release: in the unit tests it is an error.
    if not config.getoption("--allow-deprecations"):
        config.addinivalue_line("filterwarnings", "error::FutureWarning")
        config.addinivalue_line("filterwarnings", "error::DeprecationWarning")


@pytest.fixture(autouse=True)
def no_deprecation_notices(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    """transformers also announces deprecations in its log (once per process): none may appear."""
    with caplog.at_level(logging.WARNING, logger="transformers"):
        yield
    if request.config.getoption("--allow-deprecations"):
        return
    records = caplog.get_records("setup") + caplog.get_records("call")
    notices = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not notices, f"deprecation notices: {notices}"


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed per test: every check runs on new random inputs."""
    gen = torch.Generator()
    gen.seed()
    return gen

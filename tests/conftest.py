import pytest
import torch


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed per test: every check runs on new random inputs."""
    gen = torch.Generator()
    gen.seed()
    return gen

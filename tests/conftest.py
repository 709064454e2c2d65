import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; the variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed per test: every check runs on new random inputs."""
    gen = torch.Generator()
    gen.seed()
    return gen

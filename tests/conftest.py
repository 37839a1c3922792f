"""Test set-up shared by every test file.

Without a GPU, Triton kernels run under the interpreter on CPU tensors; TRITON_INTERPRET must
be set before any @triton.jit definition is imported, so it is set here, first.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastguide._threads import torch_threads  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models and the many small ops of reference samplers run
    fastest (and steadiest on a busy machine) that way."""
    with torch_threads(1):
        yield


@pytest.fixture
def generator():
    """A fresh, seeded CPU generator per test, so inputs are random but reproducible."""
    return torch.Generator().manual_seed(1234)

import os

import pytest
import torch

# Triton runs kernels on CPU tensors only through its interpreter, and it reads
# TRITON_INTERPRET when triton is first imported (Inductor imports it early), so it
# must be set before any test module loads. On a CUDA machine kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: the CUDA case of a device-parameterized test (bench/gpu_check.sh "
                   "--quick runs these: -m cuda)")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

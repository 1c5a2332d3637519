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
    config.addinivalue_line(
        "markers", "hf_inductor_cpu: compiles Hugging Face Llama graphs with Inductor's C++ "
                   "backend (expected to fail on torch < 2.13, see conftest.py)")


# torch 2.11's CPU Inductor emits C++ that uses a variable before declaring it ("'tmp2' was not
# declared in this scope", an index-bounds check) for HF Llama graphs with dynamic shapes;
# torch 2.13 compiles them. make test-compat (torch 2.11 on CPU) shows it; the GPU machine
# compiles those graphs to Triton instead.
OLD_CPU_INDUCTOR = (tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)
                    and not torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if OLD_CPU_INDUCTOR and item.get_closest_marker("hf_inductor_cpu"):
            item.add_marker(pytest.mark.xfail(
                reason="torch < 2.13 CPU Inductor miscompiles HF Llama graphs (conftest.py)",
                strict=False))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

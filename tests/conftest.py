"""One intra-op torch thread per test, restored afterwards: the suite runs under ``pytest -n 2`` on
2 cores, and tiny models with two OpenMP threads per worker spend most of their time in thread
barriers (milliseconds instead of microseconds per matmul) when the cores are busy."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

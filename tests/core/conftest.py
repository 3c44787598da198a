"""One intra-op thread for the core tests: under `pytest -n 2` on 2 shared cores, two OpenMP threads
per worker spin-wait on each other and tiny matmuls take milliseconds instead of microseconds."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Synthetic problems shared by the classic MoE tests (small, so the whole directory stays fast)."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits


def two_lines(n: int = 600, seed: int = 0, gated: bool = False):
    """y = 2x + 1 (noise 0.1) or y = -x - 1 (noise 0.3); the line is picked at random with p=0.4/0.6,
    or (``gated``) by the sign of x."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, n)
    first = x > 0 if gated else rng.random(n) < 0.4
    y = np.where(first, 2 * x + 1 + 0.1 * rng.standard_normal(n), -x - 1 + 0.3 * rng.standard_normal(n))
    return x[:, None], y


@pytest.fixture
def make_two_lines():
    return two_lines


@pytest.fixture
def two_line_data():
    return two_lines()


@pytest.fixture
def gated_line_data():
    return two_lines(gated=True)


@pytest.fixture(autouse=True)
def _single_threaded_blas():
    """One BLAS thread: the test machines are shared, and a multi-threaded BLAS spin-waiting for a
    busy core makes these tall-skinny products many times slower, not faster."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield

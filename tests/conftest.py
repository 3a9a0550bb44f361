"""Test session setup: OpenMP threads sleep when idle (set before torch loads; see fxq/cli.py)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """torch on one thread: a compile runs many tiny ops, and on a 2-core machine shared with
    other work two threads make them many times slower (see docs/benchmarks.md)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

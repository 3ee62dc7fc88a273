"""Shared test set-up: fixed seeds, quiet logs, one torch thread per pytest-xdist worker.

The suite runs with ``-n auto --dist load`` (pyproject.toml): one worker per core, each with one torch thread
(tiny models gain little from a second thread, a second worker doubles the throughput); each worker builds
the module- and session-scoped fixtures (compiled models, process groups) its tests need. Keeping the tests
that share a fixture in one worker (``--dist loadgroup``) saved about 50 s on a warm Inductor cache, but a
fresh clone (cold cache) ran 949 s that way, over CI's 15 minutes: the groups are few, large and uneven.
"""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed; inputs are still drawn fresh inside each test."""
    torch.manual_seed(0)
    yield

"""Shared test set-up: fixed seeds, quiet logs, and how tests are spread over pytest-xdist workers.

The suite runs with ``-n auto --dist loadgroup`` (pyproject.toml): one worker per core, each with one torch
thread (tiny models gain little from a second thread, a second worker doubles the throughput). Tests that
share an expensive cached model must run in the same worker or each worker would build it again: in the
modules that test the discovered families (they import ``_families.FAMILIES``), the tests of one family
share its tiny model across modules; every other module's tests share its module- and session-scoped
fixtures (compiled models, process groups).
"""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Put each test in the xdist group of the cached model it shares (its family, else its module). First
    among the hooks: pytest-xdist's own reads the groups from the markers in the same hook, and without
    ``tryfirst`` it ran before this one and saw none (every module's tests spread over both workers, each
    building the module's fixtures again)."""
    for item in items:
        params = getattr(item, "callspec", None)
        family = params.params.get("name") if params is not None else None
        if family in getattr(item.module, "FAMILIES", ()):
            group = f"family:{family}"
        else:
            group = f"module:{item.module.__name__}"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed; inputs are still drawn fresh inside each test."""
    torch.manual_seed(0)
    yield

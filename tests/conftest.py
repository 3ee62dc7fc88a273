"""Shared test set-up: fixed seeds, quiet logs, one torch thread per pytest-xdist worker.

The suite runs with ``-n auto --dist loadgroup`` (pyproject.toml): one worker per core, each with one torch
thread (tiny models gain little from a second thread, a second worker doubles the throughput); each worker
builds the module- and session-scoped fixtures (compiled models, process groups) its tests need. Tests without
an ``xdist_group`` mark are spread one by one as with ``--dist load``; a group runs whole on one worker, and
the largest group is handed out first. Groups are kept few and only where tests share costly per-process work
(test_regroup_families.py: every family's detection, about 4 s CPU per family, and conversion), because an
earlier split of the whole suite into groups (one per fixture) made them few, large and uneven: a fresh clone
(cold Inductor cache) ran 949 s that way.
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


@pytest.fixture(autouse=True)
def _prefills_span_several_query_blocks(monkeypatch):
    """The tiny models' prompts are shorter than blocked_attention.QUERY_BLOCK; a block of 7 rows (dividing no
    prompt, window or padding length of the suite) makes every CPU prefill span several blocks, partial ones
    included. tests/test_blocked_attention.py checks the op at its own block size too."""
    from gqla_compile import blocked_attention

    monkeypatch.setattr(blocked_attention, "QUERY_BLOCK", 7)

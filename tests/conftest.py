"""Shared test set-up: fixed seeds and quiet logs. Models are tiny and built from configs in the tests."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seed; inputs are still drawn fresh inside each test."""
    torch.manual_seed(0)
    yield

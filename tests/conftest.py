"""Shared test fixtures. Tests that need ../shared (datasets, fixtures) skip with a reason when it is absent."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"
FIXTURES = SHARED / "fixtures"

# Tiny test models run fastest on one thread, and one thread cannot oversubscribe a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def same_random_state():
    """Each test starts from the same random state, so its outcome does not hang on which tests ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def need(path: Path) -> Path:
    """Skip the calling test unless `path` exists (the shared data lives beside the checkout, not in it)."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared datasets / fixtures folder beside the checkout)")
    return path


@pytest.fixture
def datasets() -> Path:
    return need(DATASETS)


@pytest.fixture
def fixtures() -> Path:
    return need(FIXTURES)

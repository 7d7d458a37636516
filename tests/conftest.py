"""Shared test fixtures. Tests that need ../shared (datasets, fixtures) skip with a reason when it is absent."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"
FIXTURES = SHARED / "fixtures"

# Tiny test models run fastest on one thread, and one thread cannot oversubscribe a busy 2-core machine.
torch.set_num_threads(1)


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

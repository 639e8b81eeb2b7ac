"""Shared test fixtures: where the reference data lives, and seeding."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_dir(*parts: str) -> Path:
    """Path under ../shared, or skip the test with a clear reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference fixtures not found at {path} (../shared is absent on this machine)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine OpenMP threads fighting
    over the CPU made the T5 and fine-tuning tests 7-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

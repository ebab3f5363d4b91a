from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST / Fashion-MNIST idx files (read-only) that ship beside the checkout in ../shared/data."""
    root = REPO.parent / "shared" / "data"
    if not (root / "MNIST" / "raw").exists():
        pytest.skip(f"MNIST files not found under {root}")
    return root

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


@pytest.fixture(scope="session")
def sim():
    """Skip unless ManiSkill3 and a usable Vulkan device are there (tests that use it are marked ``sim``)."""
    pytest.importorskip("mani_skill", reason="mani_skill not installed: pip install -e .[sim]")
    from envs import vulkan

    if not vulkan.vulkan_available():
        pytest.skip(f"no usable Vulkan device ({vulkan.vulkan_status()[1]}); run `bash scripts/setup_vulkan.sh`")

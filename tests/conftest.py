import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_SIMPLER_ROOT = REPO / "tests" / "fakes" / "simpler"  # the exact-API SimplerEnv fake (its README)
FAKE_SIMPLER_PACKAGES = ("simpler_env", "mani_skill2_real2sim")
GRID = [[-0.1, -0.1], [-0.1, 0.1], [0.1, -0.1], [0.1, 0.1]]  # the 2x2 placement grid of the fake demos


def fake_episode(cell: int, attempt: int, length: int, size: int = 8):
    """A recorded pick-can episode with random frames and states and the expert's action-token layout."""
    import torch

    from data_collection.collect import episode_seed
    from data_collection.dataset import Episode
    from vla_razor.action_tokens import make_action_tokenizer

    g = torch.Generator().manual_seed(cell * 100 + attempt)
    actions = torch.rand(length, 7, generator=g) * 2 - 1
    return Episode(cell=cell, x=GRID[cell][0], y=GRID[cell][1], seed=episode_seed(0, cell, attempt), attempt=attempt,
                   success=True, images=torch.randint(0, 256, (length, size, size, 3), dtype=torch.uint8, generator=g),
                   states=torch.randn(length, 19, generator=g), actions=actions,
                   tokens=make_action_tokenizer().encode(actions).long())


def fake_metadata(per_cell: int = 2) -> dict:
    """collect-demos' metadata.json for :func:`fake_episode` episodes on :data:`GRID`."""
    return {"task": "pick_can", "expert": "scripted", "instruction": "pick coke can", "image_size": 8,
            "grid": {"n_x": 2, "n_y": 2, "positions": GRID}, "per_cell": per_cell, "max_failures_per_cell": 10,
            "seed": 0, "max_episode_steps": None, "tokenizer": {"num_bins": 256, "ids": "window"}}


def _pop_simpler_modules() -> dict:
    return {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in FAKE_SIMPLER_PACKAGES}


@pytest.fixture
def assets(tmp_path) -> Path:
    """A ManiSkill2_real2sim data folder holding the overlay photo names (the fake checks existence only)."""
    from envs.simpler import DRAWER_STATIONS

    folder = tmp_path / "real2sim_data"
    (folder / "real_inpainting").mkdir(parents=True)
    for name in ["google_coke_can_real_eval_1.png"] + [s.overlay for s in DRAWER_STATIONS.values()]:
        (folder / "real_inpainting" / name).write_bytes(b"")
    return folder


@pytest.fixture
def fake_simpler(monkeypatch, assets):
    """The fake SimplerEnv importable for one test, in place of a real one if that is installed (its modules and
    gymnasium ids are set aside and restored afterwards, so no later test sees the fake)."""
    import gymnasium as gym

    from envs.simpler import SIMPLER_TASKS

    real_modules = _pop_simpler_modules()
    real_ids = {env_id: gym.registry.pop(env_id) for env_id in {t.env_id for t in SIMPLER_TASKS.values()}
                if env_id in gym.registry}
    before = set(gym.registry)
    monkeypatch.syspath_prepend(str(FAKE_SIMPLER_ROOT))
    monkeypatch.setenv("MS2_REAL2SIM_ASSET_DIR", str(assets))
    yield importlib.import_module("simpler_env")
    _pop_simpler_modules()
    for env_id in set(gym.registry) - before:
        del gym.registry[env_id]
    gym.registry.update(real_ids)
    sys.modules.update(real_modules)


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

"""The SimplerEnv backend against the real SimplerEnv: runs wherever `simpler_env` imports, skipped otherwise.

Install: README, "SimplerEnv backend". Uses the fast "ibl" shader (drawer scenes default to ray tracing). The
RT-1 check also needs the rt1 extra and VLA_RAZOR_RT1_CHECKPOINT=<RT-1 SavedModel folder>.
"""

import os

import numpy as np
import pytest

simpler_env = pytest.importorskip(
    "simpler_env", reason="SimplerEnv is not installed (GitHub-only; README 'SimplerEnv backend' shows how)")

from envs import make_task  # noqa: E402
from envs.simpler import DRAWER_STATIONS, SIMPLER_TASKS  # noqa: E402

pytestmark = pytest.mark.simpler


@pytest.fixture(scope="module")
def coke_can():
    env = make_task("simpler_pick_coke_can_standing", image_size=64, shader="ibl")
    yield env
    env.close()


def test_task_table_matches_simpler_envs_environment_map():
    for task in SIMPLER_TASKS.values():
        env_id, kwargs = simpler_env.ENVIRONMENT_MAP[task.simpler_name]
        # simpler_env.make writes obs_mode / prepackaged_config into these dicts; they are not the variant
        variant = {k: v for k, v in kwargs.items() if k not in ("obs_mode", "prepackaged_config")}
        assert (task.env_id, dict(task.variant_kwargs)) == (env_id, variant), task.name


def test_coke_can_obs_placement_robot_pose_and_step(coke_can):
    obs, info = coke_can.reset(seed=0, options={"obj_init_xy": [-0.2, 0.1]})
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8 and obs["image"].std() > 5
    assert obs["state"].shape == (18,) and np.isfinite(obs["state"]).all()
    assert coke_can.overhead_rgb.shape == (512, 640, 3)
    assert coke_can.instruction == "pick coke can" and coke_can.max_episode_steps == 80
    np.testing.assert_allclose(obs["state"][11:13], [0.35, 0.20], atol=1e-4)  # base_pose xy: the photo's pose
    np.testing.assert_allclose(coke_can.unwrapped.obj.pose.p[:2], [-0.2, 0.1], atol=0.02)  # settled on the table
    obs, reward, terminated, truncated, info = coke_can.step(np.zeros(7))
    assert info["success"] is False and not terminated and not truncated and reward == 0.0


def test_same_seed_and_placement_reproduce_the_first_frame(coke_can):
    first = coke_can.reset(seed=3, options={"obj_init_xy": [-0.3, 0.3]})[0]
    again = coke_can.reset(seed=3, options={"obj_init_xy": [-0.3, 0.3]})[0]
    np.testing.assert_array_equal(first["state"], again["state"])


@pytest.mark.parametrize("name, opening", [("simpler_open_drawer_top", 0.0), ("simpler_close_drawer_middle", 0.2)])
def test_drawer_station_instruction_and_initial_opening(name, opening):
    env = make_task(name, image_size=32, shader="ibl", station="c0")
    try:
        obs, _ = env.reset(seed=0)
        assert env.instruction == f"{name.split('_')[1]} {name.split('_')[-1]} drawer"
        assert env.max_episode_steps == 113
        np.testing.assert_allclose(obs["state"][11:13], DRAWER_STATIONS["c0"].robot_xy, atol=1e-4)
        base = env.unwrapped
        assert base.art_obj.get_qpos()[base.joint_idx] == pytest.approx(opening, abs=1e-3)
    finally:
        env.close()


def test_rt1_expert_emits_env_actions():
    checkpoint = os.environ.get("VLA_RAZOR_RT1_CHECKPOINT")
    if not checkpoint:
        pytest.skip("set VLA_RAZOR_RT1_CHECKPOINT to an RT-1 SavedModel folder to run RT-1")
    pytest.importorskip("tensorflow", reason="the rt1 extra is not installed: pip install -e '.[rt1]'")
    from policies.rt1_expert import RT1Expert

    env = make_task("simpler_pick_coke_can", image_size=32, shader="ibl", max_episode_steps=3)
    try:
        expert = RT1Expert(checkpoint)
        obs, _ = env.reset(seed=0, options={"obj_init_xy": [-0.2, 0.1]})
        expert.reset(env)
        for _ in range(3):
            action = expert.act(env, obs)
            assert action.shape == (7,) and np.isfinite(action).all()
            obs, *_ = env.step(action)
    finally:
        env.close()

"""SimplerEnv backend (envs.simpler, SimplerObservation, the TorchRL adapter, RT-1 expert, collect-demos) against
the exact-API fake in tests/fakes/simpler (see its README). The real SimplerEnv suite is tests/test_simpler_real.py."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAKE_SIMPLER_ROOT as FAKE_ROOT
from envs import known_tasks, make_task, placement_box, state_layout, task_instruction
from envs.simpler import (
    COKE_CAN_BOX,
    SIMPLER_TASKS,
    SimplerEnvUnavailableError,
    base_quaternion,
)
from envs.simpler_actions import simpler_to_policy_actions, unnormalize_fractal

REPO = Path(__file__).resolve().parents[1]
def test_every_task_maps_to_simpler_envs_own_env_id_and_variant_kwargs(fake_simpler):
    assert set(known_tasks()) >= set(SIMPLER_TASKS) | {"pick_can", "open_drawer", "close_drawer"}
    for task in SIMPLER_TASKS.values():
        env_id, kwargs = fake_simpler.ENVIRONMENT_MAP[task.simpler_name]
        assert (task.env_id, dict(task.variant_kwargs)) == (env_id, kwargs), task.name
    assert {t.simpler_name for t in SIMPLER_TASKS.values()} == set(fake_simpler.ENVIRONMENT_MAP)


def test_placement_box_state_layout_and_instruction_dispatch():
    for name in ("simpler_pick_coke_can", "simpler_pick_coke_can_standing"):
        assert placement_box(name) == ((-0.35, -0.12), (-0.02, 0.42)) == COKE_CAN_BOX
    with pytest.raises(ValueError, match="no placement box.*station"):
        placement_box("simpler_open_drawer_top")
    assert sum(size for _, size in state_layout("simpler_close_drawer")) == 18
    assert task_instruction("simpler_close_drawer_middle") == "close middle drawer"
    assert task_instruction("simpler_open_drawer") is None  # the drawer is drawn per episode
    with pytest.raises(ValueError, match="unknown task 'simpler_pick_pepsi'.*simpler_pick_coke_can"):
        state_layout("simpler_pick_pepsi")


def test_missing_simpler_env_gives_one_error_that_says_how_to_install():
    if importlib.util.find_spec("simpler_env") is not None:
        pytest.skip("a simpler_env is importable here")
    with pytest.raises(SimplerEnvUnavailableError, match="git clone --recurse-submodules .*pip install -e"):
        make_task("simpler_pick_coke_can")


def test_missing_overlay_photo_names_the_asset_variable(fake_simpler, assets):
    (assets / "real_inpainting" / "open_drawer_c2.png").unlink()
    with pytest.raises(SimplerEnvUnavailableError, match="open_drawer_c2.png is missing: set MS2_REAL2SIM_ASSET_DIR"):
        make_task("simpler_open_drawer", station="c2")


def test_env_is_built_with_visual_matching_kwargs_and_explicit_shader(fake_simpler, assets):
    env = make_task("simpler_pick_coke_can_horizontal", image_size=32)
    given = env.unwrapped.fake_init_kwargs
    assert given == {
        "obs_mode": "rgbd", "robot": "google_robot_static", "control_freq": 3, "sim_freq": 513,
        "control_mode": "arm_pd_ee_delta_pose_align_interpolate_by_planner"
                        "_gripper_pd_joint_target_delta_pos_interpolate_by_planner",
        "camera_cfgs": {"add_segmentation": True}, "rgb_overlay_cameras": ["overhead_camera"], "urdf_version": "",
        "prepackaged_config": False, "scene_name": "google_pick_coke_can_1_v4", "shader_dir": "ibl",
        "rgb_overlay_path": str(assets / "real_inpainting" / "google_coke_can_real_eval_1.png"), "lr_switch": True,
    }
    drawer = make_task("simpler_close_drawer_top", urdf_version="recolor_cabinet_visual_matching_1", station="a2")
    given = drawer.unwrapped.fake_init_kwargs
    assert (given["shader_dir"], given["scene_name"], given["station_name"], given["light_mode"]) == \
        ("rt", "dummy_drawer", "mk_station_recolor", "simple")
    assert given["disable_bad_material"] and given["urdf_version"] == "recolor_cabinet_visual_matching_1"
    assert given["rgb_overlay_path"].endswith("real_inpainting/open_drawer_a2.png")
    assert make_task("simpler_open_drawer", shader="ibl").unwrapped.fake_init_kwargs["shader_dir"] == "ibl"
    with pytest.raises(ValueError, match="shader='raytrace' is not one of"):
        make_task("simpler_open_drawer", shader="raytrace")
    with pytest.raises(ValueError, match="station='b1' applies to drawer tasks only"):
        make_task("simpler_pick_coke_can", station="b1")


def test_simpler_env_make_leaks_kwargs_but_make_task_is_not_affected(fake_simpler):
    with pytest.warns(UserWarning):  # the second call already sees the first one's kwargs
        for _ in range(2):
            fake_simpler.make("google_robot_open_drawer", shader_dir="ibl")
    assert fake_simpler.ENVIRONMENT_MAP["google_robot_open_drawer"][1]["shader_dir"] == "ibl"  # the leak
    given = make_task("simpler_open_drawer").unwrapped.fake_init_kwargs
    assert given["shader_dir"] == "rt" and given["prepackaged_config"] is False


def test_observation_layout_matches_simpler_envs_own_image_and_agent_state(fake_simpler):
    from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict

    env = make_task("simpler_pick_coke_can", image_size=64)
    obs, info = env.reset(seed=0, options={"obj_init_xy": [-0.3, 0.4]})
    assert set(obs) == {"image", "state"} and info["success"] is False
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (18,) and obs["state"].dtype == np.float32
    raw = env.env.step(np.zeros(7))[0]  # SimplerEnv's own obs dict one step on
    obs = env.observation(raw)
    np.testing.assert_array_equal(env.overhead_rgb, get_image_from_maniskill2_obs_dict(env.unwrapped, raw))
    assert env.overhead_rgb.shape == (512, 640, 3)
    np.testing.assert_allclose(obs["state"], np.concatenate([raw["agent"]["qpos"], raw["agent"]["base_pose"]]),
                               rtol=1e-6)
    # area averaging keeps the frame's mean colour (a nearest-neighbour resize would not, on the thin markers)
    np.testing.assert_allclose(obs["image"].reshape(-1, 3).mean(0), env.overhead_rgb.reshape(-1, 3).mean(0), atol=1.0)
    state_only = make_task("simpler_pick_coke_can", render_images=False)
    assert set(state_only.reset(seed=0)[0]) == {"state"}
    assert state_only.unwrapped.fake_init_kwargs["obs_mode"] == "state_dict"


def test_reset_places_the_can_and_the_robot_at_the_photo_pose(fake_simpler):
    env = make_task("simpler_pick_coke_can_standing", image_size=16)
    env.reset(seed=1, options={"obj_init_xy": [-0.2, 0.1]})
    base = env.unwrapped
    assert base.obj_init_options == {"init_xy": [-0.2, 0.1], "orientation": "upright"}
    assert base.robot_init_options == {"init_xy": [0.35, 0.20], "init_rot_quat": [0.0, 0.0, 0.0, 1.0]}
    env.reset(seed=1)  # without a placement SimplerEnv draws the can from the seed
    assert "init_xy" not in base.obj_init_options
    generic = make_task("simpler_pick_coke_can", image_size=16)
    orientations = set()
    for seed in range(8):
        generic.reset(seed=seed)
        orientations.add(generic.unwrapped.obj_init_options["orientation"])
    assert len(orientations) > 1  # the generic task mixes the three can poses
    with pytest.raises(ValueError, match="accept only 'obj_init_xy'"):
        env.reset(seed=0, options={"obj_init_options": {"init_xy": [0, 0]}})
    with pytest.raises(ValueError, match=r"must be \[x, y\]"):
        env.reset(seed=0, options={"obj_init_xy": [0.1]})


def test_drawer_station_sets_the_robot_pose_and_rejects_placements(fake_simpler):
    env = make_task("simpler_open_drawer_top", image_size=16, station="c1")
    env.reset(seed=0)
    robot = env.unwrapped.robot_init_options
    assert robot["init_xy"] == [0.765, 0.222]
    np.testing.assert_allclose(robot["init_rot_quat"], [-np.sin(-0.0125), 0.0, 0.0, np.cos(-0.0125)])
    with pytest.raises(ValueError, match="fixed cabinet and takes no obj_init_xy"):
        env.reset(seed=0, options={"obj_init_xy": [0.0, 0.0]})
    with pytest.raises(ValueError, match="station='z9' is not a drawer station"):
        make_task("simpler_open_drawer", station="z9")


def test_base_quaternion_composes_yaw_with_the_default_facing():
    from scipy.spatial.transform import Rotation

    for yaw in (0.0, -0.03, 0.5, np.pi):
        w, x, y, z = base_quaternion(yaw)
        composed = Rotation.from_euler("z", yaw) * Rotation.from_quat([0, 0, 1, 0])  # scipy is xyzw
        assert abs(np.dot(composed.as_quat(), [x, y, z, w])) == pytest.approx(1.0)  # same rotation up to sign


def test_instructions_episode_limits_success_and_truncation(fake_simpler):
    assert make_task("simpler_pick_coke_can").instruction == "pick coke can"
    generic = make_task("simpler_open_drawer", image_size=16)
    seen = set()
    for seed in range(10):
        generic.reset(seed=seed)
        seen.add(generic.instruction)
    assert seen <= {"open top drawer", "open middle drawer", "open bottom drawer"} and len(seen) > 1
    assert generic.max_episode_steps == 113 and make_task("simpler_pick_coke_can").max_episode_steps == 80

    opener = make_task("simpler_open_drawer_bottom", image_size=16)
    opener.reset(seed=0)
    obs, reward, terminated, truncated, info = opener.step(np.array([0.2, 0, 0, 0, 0, 0, 0]))
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    closer = make_task("simpler_close_drawer_bottom", image_size=16)  # SimplerEnv opens it to 0.2 first
    closer.reset(seed=0)
    assert closer.step(np.zeros(7))[4]["success"] is False
    assert closer.step(np.array([-0.2, 0, 0, 0, 0, 0, 0]))[4]["success"] is True

    short = make_task("simpler_pick_coke_can", image_size=16, max_episode_steps=3)
    short.reset(seed=0)
    flags = [short.step(np.zeros(7))[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_torchrl_adapter_takes_policy_actions_and_the_state_size_from_the_env(fake_simpler):
    from torchrl.envs.utils import check_env_specs

    from envs.torchrl_adapter import ManiSkillVLAEnv

    env = ManiSkillVLAEnv("simpler_pick_coke_can", image_size=32, placements=[[-0.3, 0.0]], seed=4)
    check_env_specs(env)
    td = env.reset()
    assert td["observation", "state"].shape == (18,) and td["observation", "image"].shape == (3, 32, 32)
    assert td["language_instruction"] == "pick coke can"
    assert env.gym_env.unwrapped.obj_init_options["init_xy"] == [-0.3, 0.0]
    base = env.gym_env.unwrapped
    tcp = base.tcp.copy()
    open_gripper = torch.tensor([0, 0, 0, 0, 0, 0, 1.0])
    env.step(td.set("action", open_gripper))
    # the env moved by the un-normalized action, and the first gripper step is relative 0 (not the raw 1.0)
    np.testing.assert_allclose(base.tcp - tcp, unnormalize_fractal(np.zeros(6))[:3], atol=1e-6)
    assert base.closedness == 0.0
    env.step(td.set("action", torch.zeros(7)))  # target closed: relative +1 (close)
    assert base.closedness == pytest.approx(1.0)


# --- RT-1 expert -----------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    folder = tmp_path / "rt_1_tf_trained_for_000400120"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"")
    return folder


def test_rt1_checkpoint_errors_say_what_to_pass(tmp_path):
    from policies.rt1_expert import RT1UnavailableError, check_checkpoint

    with pytest.raises(RT1UnavailableError, match="needs rt1_checkpoint="):
        check_checkpoint(None)
    with pytest.raises(RT1UnavailableError, match="is not a folder"):
        check_checkpoint(tmp_path / "nope")
    with pytest.raises(RT1UnavailableError, match="no saved_model.pb"):
        check_checkpoint(tmp_path)


def test_rt1_missing_extra_or_simpler_env_errors(checkpoint, monkeypatch, request):
    from policies.rt1_expert import RT1Expert, RT1UnavailableError

    if importlib.util.find_spec("simpler_env") is None:
        with pytest.raises(RT1UnavailableError, match="needs SimplerEnv.*git clone"):
            RT1Expert(checkpoint)
    request.getfixturevalue("fake_simpler")
    monkeypatch.setenv("FAKE_RT1_MISSING_TF", "1")
    with pytest.raises(RT1UnavailableError, match=r"cannot import 'tensorflow'.*pip install -e '\.\[rt1\]'"):
        RT1Expert(checkpoint)


def test_rt1_expert_acts_on_the_full_overhead_frame(fake_simpler, checkpoint):
    from policies.rt1_expert import RT1Expert

    expert = RT1Expert(checkpoint)
    env = make_task("simpler_pick_coke_can", image_size=32)
    obs, _ = env.reset(seed=0, options={"obj_init_xy": [-0.2, 0.2]})
    expert.reset(env)
    actions, done = [], False
    while not done:
        actions.append(expert.act(env, obs))
        obs, _, terminated, truncated, info = env.step(actions[-1])
        done = terminated or truncated
    assert info["success"] and len(actions) == 4  # two steps down, close, lift
    np.testing.assert_allclose(actions[0], [0, 0, -0.02, 0.01, -0.02, 0.03, 0], atol=1e-7)
    assert actions[0].dtype == np.float32 and actions[2][6] == 1.0
    assert expert.model.images_seen == [(512, 640, 3)] * 4
    assert expert.model.task_description == "pick coke can"
    with pytest.raises(ValueError, match="needs a SimplerEnv task env with images"):
        expert.reset(make_task("simpler_pick_coke_can", render_images=False))


# --- collect-demos ---------------------------------------------------------------------------------------------


def test_collect_demos_validation_errors(checkpoint, tmp_path):
    from vla_razor.cli.collect_demos import CollectDemosConfig, check_same_dataset, validate

    def error(**overrides) -> str:
        with pytest.raises(Exception) as info:
            validate(CollectDemosConfig(**overrides))
        return str(info.value)

    assert "use expert=rt1 rt1_checkpoint=" in error(env="simpler_pick_coke_can")
    assert "expert=rt1 drives SimplerEnv's Google robot only" in error(env="pick_can", expert="rt1",
                                                                       rt1_checkpoint=str(checkpoint))
    assert "needs rt1_checkpoint=" in error(env="simpler_pick_coke_can", expert="rt1")
    assert "fixed cabinet and no placement grid" in error(env="simpler_open_drawer_top", expert="rt1")
    assert "applies to SimplerEnv tasks only" in error(env="pick_can", shader="ibl")
    assert "is not one of" in error(env="simpler_pick_coke_can", expert="rt1", rt1_checkpoint=str(checkpoint),
                                    shader="fast")
    assert "drop it or use expert=rt1" in error(env="pick_can", rt1_checkpoint=str(checkpoint))
    validate(CollectDemosConfig(env="simpler_pick_coke_can", expert="rt1", rt1_checkpoint=str(checkpoint)))
    with pytest.raises(Exception, match="shader: folder has 'default', this run asks 'ibl'"):
        check_same_dataset(tmp_path, {"task": "simpler_pick_coke_can", "shader": "default"},
                           {"task": "simpler_pick_coke_can", "shader": "ibl"})


def test_collect_demos_cli_runs_end_to_end_on_the_fake(assets, checkpoint, tmp_path):
    from data_collection.dataset import DemoDataset
    from envs.placement import grid_positions
    from vla_razor.action_tokens import make_action_tokenizer

    out = tmp_path / "demos"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE_ROOT), os.environ.get("PYTHONPATH", "")]),
           "MS2_REAL2SIM_ASSET_DIR": str(assets)}
    result = subprocess.run([sys.executable, "-m", "vla_razor.cli.collect_demos", "env=simpler_pick_coke_can",
                             "expert=rt1", f"rt1_checkpoint={checkpoint}", "grid=2", "per_cell=1", "image_size=32",
                             f"out_dir={out}", "progress=false"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = DemoDataset(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["complete"] and meta["instruction"] == "pick coke can" and meta["shader"] == "default"
    assert meta["rt1_checkpoint"] == "rt_1_tf_trained_for_000400120"
    assert meta["state_layout"] == [["qpos", 11], ["base_pose", 7]]
    np.testing.assert_allclose(meta["grid"]["positions"], grid_positions(2, 2, *COKE_CAN_BOX))
    tokenizer = make_action_tokenizer()
    episodes = list(data.episodes())
    assert len(episodes) == 4
    for row, steps in episodes:
        assert row["success"] and row["length"] == 4
        assert steps["observation", "image"].shape == (4, 32, 32, 3)
        assert steps["observation", "state"].shape == (4, 18)
        actions = steps["action"].numpy()
        np.testing.assert_allclose(actions[:, 2], [-0.02, -0.02, 0.0, 0.02], atol=1e-7)  # RT-1's env actions
        tokens = steps["vla_action", "tokens"]
        assert torch.equal(tokens, tokenizer.encode(torch.from_numpy(simpler_to_policy_actions(actions))).long())
        assert tokens[:, 6].tolist() == [0, 0, 128, 128]  # open, open, then closed: OpenVLA's gripper labels

"""Fake ManiSkill2_real2sim envs: the constructor / reset / step / obs contract of the Google-robot scenes.

Mirrors `envs/sapien_env.py` (BaseEnv kwargs, obs modes, reset seeding, terminated = success),
`envs/custom_scenes/base_env.py` (CustomSceneEnv kwargs, overlay file check, robot_init_options, base_pose),
`grasp_single_in_scene.py` and `open_drawer_in_scene.py` (task kwargs, obj_init_options, info keys,
instructions) and `utils/registration.py` (gymnasium registration, "rgbd" wrapper, TimeLimit).
"""

import os
from collections import OrderedDict
from functools import partial

import gymnasium as gym
import numpy as np

import mani_skill2_real2sim

H, W = 512, 640  # overhead camera
DEFAULT_QPOS = np.array([-0.2639457174606611, 0.0831913360274175, 0.5017611504652179, 1.156859026208673,
                         0.028583671314766423, 1.592598203487462, -1.080652960128774, 0, 0, -0.00285961, 0.7851361])
TABLE_HEIGHT = 0.87
ORIENTATIONS = ("upright", "laid_vertically", "lr_switch")


class FakeSceneEnv(gym.Env):
    metadata = {"render_modes": ("human", "rgb_array", "cameras")}
    SUPPORTED_OBS_MODES = ("state", "state_dict", "none", "image")

    def __init__(self, obs_mode=None, reward_mode=None, control_mode=None, render_mode=None, sim_freq=500,
                 control_freq=20, renderer="sapien", renderer_kwargs=None, shader_dir="ibl", render_config=None,
                 enable_shadow=False, camera_cfgs=None, render_camera_cfgs=None, bg_name=None,
                 # CustomSceneEnv
                 robot="google_robot_static", rgb_overlay_path=None, rgb_overlay_cameras=(),
                 rgb_overlay_mode="background", rgb_always_overlay_objects=(), disable_bad_material=False,
                 asset_root=None, scene_root=None, scene_name=None, scene_offset=None, scene_pose=None,
                 scene_table_height=TABLE_HEIGHT, model_json=None, model_ids=(), model_db_override=None,
                 urdf_version=""):
        if rgb_overlay_path is not None and not os.path.exists(rgb_overlay_path):
            raise FileNotFoundError(f"rgb_overlay_path {rgb_overlay_path} is not found.")
        if obs_mode is None:
            obs_mode = self.SUPPORTED_OBS_MODES[0]
        if obs_mode not in self.SUPPORTED_OBS_MODES:
            raise NotImplementedError(f"Unsupported obs mode: {obs_mode}")
        self._obs_mode = obs_mode
        self.robot_uid = robot
        self.shader_dir = shader_dir
        self.rgb_overlay_path = rgb_overlay_path
        self.urdf_version = "" if urdf_version in (None, "None") else urdf_version
        self._control_mode = control_mode
        self.robot_init_options = {}
        self.obj_init_options = {}
        self._main_rng = np.random.RandomState(2022)
        self.reset(seed=2022, options=dict(reconfigure=True))
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)
        self.observation_space = gym.spaces.Dict({})  # the real one derives it from a first obs

    # --- seeding and reset, as sapien_env.BaseEnv ---------------------------------------------------------
    def set_episode_rng(self, seed):
        self._episode_seed = self._main_rng.randint(2**32) if seed is None else seed
        self._episode_rng = np.random.RandomState(self._episode_seed)

    def reset(self, seed=None, options=None):
        self.set_episode_rng(seed)
        self.robot_init_options = options.get("robot_init_options", {})
        self._elapsed_steps = 0
        self._initialize_episode(options)
        robot = self.robot_init_options
        self.base_xy = np.array(robot.get("init_xy", self._episode_rng.uniform([0.30, 0.0], [0.40, 0.2])), float)
        self.base_quat = np.array(robot.get("init_rot_quat", [0, 0, 0, 1]), float)
        self.qpos = np.array(robot.get("qpos", DEFAULT_QPOS), float)
        self.tcp = np.array([-0.2, 0.2, 1.05])
        self.closedness = 0.0
        return self.get_obs(), {"scene_name": None, "urdf_version": self.urdf_version,
                                "rgb_overlay_path": self.rgb_overlay_path}

    def step(self, action):
        action = np.asarray(action)
        if action.shape != (7,):
            raise ValueError(f"action shape {action.shape} does not match (7,)")
        self.tcp = self.tcp + action[:3]
        self.closedness = float(np.clip(self.closedness + action[6], 0.0, 1.0))
        self._apply(action)
        self._elapsed_steps += 1
        obs = self.get_obs()
        info = dict(elapsed_steps=self._elapsed_steps)
        info.update(self.evaluate())
        return obs, float(info["success"]), bool(info["success"]), False, info

    # --- observations, as BaseEnv._get_obs_images + CustomSceneEnv._get_obs_agent ----------------------------
    def get_obs(self):
        agent = OrderedDict(qpos=self.qpos.copy(), qvel=np.zeros(11),
                            base_pose=np.concatenate([self.base_xy, [0.079], self.base_quat]))
        obs = OrderedDict(agent=agent, extra=self._get_obs_extra())
        if self._obs_mode == "image":
            obs["camera_param"] = {"overhead_camera": {"intrinsic_cv": np.eye(3)}}
            obs["image"] = {"overhead_camera": {"Color": self._render(), "Position": np.zeros((H, W, 4), np.float32),
                                                "Segmentation": np.zeros((H, W, 4), np.uint32)}}
        return obs

    def _render(self) -> np.ndarray:
        """Float RGBA in [0, 1] like SAPIEN's Color texture: a gradient plus squares at the tcp and object."""
        img = np.zeros((H, W, 4), np.float32)
        img[..., 0] = np.linspace(0, 1, W)[None, :]
        img[..., 1] = np.linspace(0, 1, H)[:, None]
        img[..., 3] = 1.0
        for (x, y), channel in ((self.tcp[:2], 2), (self._marker_xy(), 0)):
            row, col = int(np.clip(H / 2 + 400 * x, 8, H - 8)), int(np.clip(W / 2 + 400 * y, 8, W - 8))
            img[row - 8:row + 8, col - 8:col + 8, channel] = 1.0
        return img

    def _get_obs_extra(self):
        return OrderedDict()

    def get_language_instruction(self, **kwargs):
        raise NotImplementedError


class FakeGraspCokeCanEnv(FakeSceneEnv):
    def __init__(self, require_lifting_obj_for_success=True, success_from_episode_stats=True,
                 distractor_model_ids=None, slightly_darker_lighting=False, slightly_brighter_lighting=False,
                 darker_lighting=False, prepackaged_config=False, upright=False, laid_vertically=False,
                 lr_switch=False, **kwargs):
        self.orientation = ("upright" if upright else "laid_vertically" if laid_vertically
                            else "lr_switch" if lr_switch else None)
        self.prepackaged_config = prepackaged_config
        if prepackaged_config:
            kwargs.update(robot="google_robot_static", control_freq=3, sim_freq=513,
                          scene_name="google_pick_coke_can_1_v4", camera_cfgs={"add_segmentation": True},
                          rgb_overlay_path=str(mani_skill2_real2sim.ASSET_DIR / "real_inpainting/google_coke_can_real_eval_1.png"),
                          rgb_overlay_cameras=["overhead_camera"])
        super().__init__(**kwargs)

    def _initialize_episode(self, options):
        obj_init_options = dict(options.get("obj_init_options", {}) or {})
        if obj_init_options.get("init_rot_quat") is None:
            orientation = self.orientation or ORIENTATIONS[self._episode_rng.choice(len(ORIENTATIONS))]
            obj_init_options["orientation"] = orientation
        self.obj_init_options = obj_init_options
        xy = obj_init_options.get("init_xy")
        if xy is None:
            xy = self._episode_rng.uniform([-0.35, -0.02], [-0.12, 0.42], [2])
        self.obj = np.array([xy[0], xy[1], TABLE_HEIGHT + 0.06])
        self.obj_height_after_settle = self.obj[2]
        self.grasped = False

    def _apply(self, action):
        if self.closedness > 0.5:
            self.grasped = True
        if self.grasped:
            self.obj = self.obj + np.array([0, 0, action[2]])

    def _marker_xy(self):
        return self.obj[:2]

    def _get_obs_extra(self):
        return OrderedDict(tcp_pose=np.concatenate([self.tcp, [1.0, 0, 0, 0]]))

    def evaluate(self, **kwargs):
        lifted = bool(self.grasped and self.obj[2] - self.obj_height_after_settle > 0.01)
        return dict(is_grasped=self.grasped, consecutive_grasp=self.grasped, lifted_object=lifted,
                    lifted_object_significantly=lifted, success=lifted,
                    episode_stats=OrderedDict(n_lift_significant=int(lifted), consec_grasp=self.grasped,
                                              grasped=self.grasped))

    def get_language_instruction(self, **kwargs):
        return "pick coke can"


class FakeDrawerEnv(FakeSceneEnv):
    drawer_ids = ("top", "middle", "bottom")
    closing = False

    def __init__(self, light_mode=None, camera_mode=None, station_name="mk_station", cabinet_joint_friction=0.05,
                 prepackaged_config=False, **kwargs):
        self.station_name = station_name
        self.light_mode = light_mode
        self.prepackaged_config = prepackaged_config
        if prepackaged_config:
            kwargs.update(robot="google_robot_static", control_freq=3, sim_freq=513, scene_name="dummy_drawer",
                          camera_cfgs={"add_segmentation": True}, rgb_overlay_cameras=["overhead_camera"],
                          rgb_overlay_path=str(mani_skill2_real2sim.ASSET_DIR / "real_inpainting/open_drawer_a0.png"),
                          shader_dir="rt", disable_bad_material=True)
        super().__init__(**kwargs)

    def _initialize_episode(self, options):
        self.drawer_id = self.drawer_ids[self._episode_rng.choice(len(self.drawer_ids))]
        obj_init_options = dict(options.get("obj_init_options", {}) or {})
        default = 0.2 if self.closing else 0.0
        self.obj_init_options = obj_init_options
        self.drawer_qpos = float(obj_init_options.get("cabinet_init_qpos", default))

    def _apply(self, action):
        self.drawer_qpos = float(np.clip(self.drawer_qpos + action[0], 0.0, 0.3))

    def _marker_xy(self):
        return np.array([-0.295 + self.drawer_qpos, 0.0])

    def evaluate(self, **kwargs):
        success = self.drawer_qpos <= 0.05 if self.closing else self.drawer_qpos >= 0.15
        return dict(success=success, qpos=self.drawer_qpos, episode_stats=OrderedDict(qpos=f"{self.drawer_qpos:.3f}"))

    def get_language_instruction(self, **kwargs):
        return f"{'close' if self.closing else 'open'} {self.drawer_id} drawer"


class RGBDObservationWrapper(gym.ObservationWrapper):
    """Color float RGBA -> uint8 "rgb", Position -> "depth", as utils/wrappers/observation.py."""

    def observation(self, observation):
        for cam, images in observation["image"].items():
            new = OrderedDict()
            for key, value in images.items():
                if key == "Color":
                    new["rgb"] = np.clip(value[..., :3] * 255, 0, 255).astype(np.uint8)
                elif key == "Position":
                    new["depth"] = -value[..., [2]]
                else:
                    new[key] = value
            observation["image"][cam] = new
        return observation


def _make(env_cls, **kwargs):
    """Entry point with registration.make's obs-mode dispatch; records the kwargs it was given."""
    obs_mode = kwargs.get("obs_mode") or env_cls.SUPPORTED_OBS_MODES[0]
    given = dict(kwargs)
    if obs_mode not in ["state", "state_dict", "none", "particles"]:
        kwargs["obs_mode"] = "image"
    env = env_cls(**kwargs)
    env.fake_init_kwargs = given
    return RGBDObservationWrapper(env) if "rgbd" in obs_mode else env


def _drawer_class(name, closing, drawers):
    return type(name, (FakeDrawerEnv,), {"closing": closing, "drawer_ids": drawers})


ENV_CLASSES = {"GraspSingleOpenedCokeCanInScene-v0": (FakeGraspCokeCanEnv, 80)}
for _verb, _closing in (("Open", False), ("Close", True)):
    ENV_CLASSES[f"{_verb}DrawerCustomInScene-v0"] = (_drawer_class(f"{_verb}Drawer", _closing,
                                                                   ("top", "middle", "bottom")), 113)
    for _drawer in ("top", "middle", "bottom"):
        ENV_CLASSES[f"{_verb}{_drawer.capitalize()}DrawerCustomInScene-v0"] = (
            _drawer_class(f"{_verb}{_drawer}Drawer", _closing, (_drawer,)), 113)

for _env_id, (_cls, _steps) in ENV_CLASSES.items():
    if _env_id not in gym.registry:
        gym.register(_env_id, entry_point=partial(_make, _cls), max_episode_steps=_steps, disable_env_checker=True)

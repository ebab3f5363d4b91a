"""SimplerEnv's Google-robot tasks (pick coke can, open / close drawer) behind vla-razor's task interface.

`make_simpler_task` (reached through `envs.make_task("simpler_...")`) returns the same interface as the
embedded ManiSkill3 tasks: obs {"image": uint8 [S, S, 3], "state": float32 [18]}, `instruction`,
`max_episode_steps`, info["success"] a bool, and `reset(seed=s, options={"obj_init_xy": [x, y]})` to place the
coke can (SimplerEnv's own placement range is the default box). Actions are SimplerEnv's (RT-1's): xyz delta
(m), axis-angle delta (rad), relative gripper (+1 close, -1 open); `envs.simpler_actions` maps policy actions
to them and back.

The scene is SimplerEnv's *visual matching* setup, as its evaluation scripts build it (scripts/rt1_*_visual_
matching.sh): Google robot at 3 Hz control / 513 Hz simulation, the real-photo background overlaid on the
overhead camera, the robot base at the pose the photo was taken from. Every kwarg is written out here and
passed to `gymnasium.make` with the ManiSkill2_real2sim env id; `simpler_env.make` is never called because it
writes its kwargs into the shared `ENVIRONMENT_MAP` dicts (they leak into every later make) and forces
`prepackaged_config=True`, which overrides explicit settings such as the shader.

Shaders (`shader=`): "ibl" rasterizes (fast, ~real time on a GPU, usable on CPU); "rt" ray-traces with 32
samples per pixel and a denoiser: soft shadows and reflections that SimplerEnv found "quite crucial for the
open / close drawer task as policies often rely on shadows to infer depth", but an order of magnitude slower
and impractical without an RTX-class GPU. "default" keeps SimplerEnv's choice per task: "rt" for the drawers,
"ibl" for the coke can. Drawer success rates measured with "ibl" are not comparable with SimplerEnv's
published visual-matching numbers.

Drawer scenes have a fixed cabinet: what varies is the *station*, one of the nine robot poses the real
evaluation photos were taken from (each with its own background photo), chosen at make time (`station=`, default "b1").
Generic drawer tasks (`simpler_open_drawer`, `simpler_close_drawer`) draw the drawer (top / middle / bottom)
from the reset seed, so their instruction changes per episode.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from envs.observation import SimplerObservation

INSTALL_HINT = (
    "SimplerEnv is GitHub-only: `git clone --recurse-submodules https://github.com/simpler-env/SimplerEnv`, then "
    "`pip install -e SimplerEnv/ManiSkill2_real2sim` and `pip install -e SimplerEnv`, in an environment without "
    "vla-razor's `sim` extra (SimplerEnv needs sapien==2.2.2 and gymnasium<1.0, ManiSkill3 needs SAPIEN 3)"
)


class SimplerEnvUnavailableError(ImportError):
    """SimplerEnv (simpler_env + mani_skill2_real2sim) is not importable, or its assets are missing."""


@dataclass(frozen=True)
class SimplerTask:
    name: str
    simpler_name: str  # SimplerEnv's task name (key of simpler_env.ENVIRONMENT_MAP)
    env_id: str  # ManiSkill2_real2sim gymnasium id
    kind: str  # "pick" | "drawer"
    variant_kwargs: tuple[tuple[str, object], ...] = ()  # ENVIRONMENT_MAP's extra kwargs for the variant
    instruction: str | None = None  # None: drawn per episode (generic drawer tasks)


def _tasks() -> dict[str, SimplerTask]:
    tasks = [
        SimplerTask("simpler_pick_coke_can", "google_robot_pick_coke_can", "GraspSingleOpenedCokeCanInScene-v0",
                    "pick", instruction="pick coke can"),
    ]
    # lr_switch: lying horizontally, flipped left-right to match the real evaluation; upright: standing.
    for suffix, flag in (("horizontal", "lr_switch"), ("vertical", "laid_vertically"), ("standing", "upright")):
        tasks.append(SimplerTask(f"simpler_pick_coke_can_{suffix}", f"google_robot_pick_{suffix}_coke_can",
                                 "GraspSingleOpenedCokeCanInScene-v0", "pick", ((flag, True),), "pick coke can"))
    for verb in ("open", "close"):
        env_verb = verb.capitalize()
        tasks.append(SimplerTask(f"simpler_{verb}_drawer", f"google_robot_{verb}_drawer",
                                 f"{env_verb}DrawerCustomInScene-v0", "drawer"))
        for drawer in ("top", "middle", "bottom"):
            tasks.append(SimplerTask(f"simpler_{verb}_drawer_{drawer}", f"google_robot_{verb}_{drawer}_drawer",
                                     f"{env_verb}{drawer.capitalize()}DrawerCustomInScene-v0", "drawer",
                                     instruction=f"{verb} {drawer} drawer"))
    return {task.name: task for task in tasks}


SIMPLER_TASKS: dict[str, SimplerTask] = _tasks()

# Layout of obs["state"] for every SimplerEnv task (Google robot; no privileged object state: SimplerEnv's
# image observations carry none).
SIMPLER_STATE_LAYOUT: tuple[tuple[str, int], ...] = (
    ("qpos", 11),  # Google-robot joints (rad; fingers too): 7 arm, 2 fingers, head pan, head tilt
    ("base_pose", 7),  # robot base in the world: xyz (m) + wxyz quaternion
)
SIMPLER_STATE_DIM = sum(size for _, size in SIMPLER_STATE_LAYOUT)

OVERHEAD_CAMERA = "overhead_camera"
GOOGLE_ROBOT = "google_robot_static"
CONTROL_MODE = ("arm_pd_ee_delta_pose_align_interpolate_by_planner"
                "_gripper_pd_joint_target_delta_pos_interpolate_by_planner")
CONTROL_FREQ, SIM_FREQ = 3, 513  # Hz, the real robot's control rate
SHADERS = ("default", "ibl", "rt")
# urdf_version "" is the stock robot; the others recolor it to match the real photos. SimplerEnv's
# visual-matching numbers average over all four.
URDF_VERSIONS = ("", "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
                 "recolor_cabinet_visual_matching_1")

# SimplerEnv's own coke-can range (its uniform default and the paper's 10x10 grid), world metres.
COKE_CAN_BOX = ((-0.35, -0.12), (-0.02, 0.42))
COKE_CAN_ROBOT_XY = (0.35, 0.20)  # where the real coke-can photo was taken from
COKE_CAN_OVERLAY = "google_coke_can_real_eval_1.png"
COKE_CAN_SCENE = "google_pick_coke_can_1_v4"


@dataclass(frozen=True)
class DrawerStation:
    robot_xy: tuple[float, float]  # world metres
    robot_yaw: float  # rad, on top of the base's default facing
    overlay: str  # real photo under ManiSkill2_real2sim's data/real_inpainting/


# The nine visual-matching setups of scripts/rt1_drawer_visual_matching.sh (open and close share them).
DRAWER_STATIONS: dict[str, DrawerStation] = {
    name: DrawerStation((x, y), yaw, f"open_drawer_{name}.png")
    for name, x, y, yaw in (
        ("a0", 0.644, -0.179, -0.03), ("a1", 0.765, -0.182, -0.02), ("a2", 0.889, -0.203, -0.06),
        ("b0", 0.652, 0.009, 0.0), ("b1", 0.752, 0.009, 0.0), ("b2", 0.851, 0.035, 0.0),
        ("c0", 0.665, 0.224, 0.0), ("c1", 0.765, 0.222, -0.025), ("c2", 0.865, 0.222, -0.025),
    )
}
DEFAULT_STATION = "b1"  # the centre one


def simpler_task(name: str) -> SimplerTask:
    if name not in SIMPLER_TASKS:
        raise ValueError(f"unknown SimplerEnv task {name!r}; known: {', '.join(SIMPLER_TASKS)}")
    return SIMPLER_TASKS[name]


def placement_box(name: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Default (x_range, y_range) of the coke can, world metres; drawers have no placement."""
    task = simpler_task(name)
    if task.kind != "pick":
        raise ValueError(f"{name} has no placement box: its cabinet is fixed and the scene varies by station "
                         f"(make_task(..., station=...), one of {', '.join(DRAWER_STATIONS)})")
    return COKE_CAN_BOX


def base_quaternion(yaw: float) -> list[float]:
    """wxyz orientation of the robot base: `yaw` about z composed with its default facing, wxyz [0, 0, 0, 1].

    (cos(yaw/2), 0, 0, sin(yaw/2)) * (0, 0, 0, 1) = (-sin(yaw/2), 0, 0, cos(yaw/2)), as SimplerEnv's argparse
    composes `--robot-init-rot-rpy-range` with `--robot-init-rot-quat-center 0 0 0 1`.
    """
    return [-float(np.sin(yaw / 2)), 0.0, 0.0, float(np.cos(yaw / 2))]


def resolve_station(task: SimplerTask, station: str | None) -> str | None:
    """The drawer station a task uses (None for the coke can, whose robot pose is fixed)."""
    if task.kind == "pick":
        if station is not None:
            raise ValueError(f"station={station!r} applies to drawer tasks only; {task.name} places its robot at "
                             f"{COKE_CAN_ROBOT_XY} (the real photo's viewpoint)")
        return None
    station = DEFAULT_STATION if station is None else station
    if station not in DRAWER_STATIONS:
        raise ValueError(f"station={station!r} is not a drawer station; choose one of {', '.join(DRAWER_STATIONS)}")
    return station


def env_kwargs(task: SimplerTask, render_images: bool, shader: str, urdf_version: str, station: str | None,
               overlay_dir: Path) -> dict:
    """Every kwarg of SimplerEnv's visual-matching setup for `task`, for `gymnasium.make(task.env_id, ...)`.

    `station` is `resolve_station`'s result.
    """
    if shader not in SHADERS:
        raise ValueError(f"shader={shader!r} is not one of {SHADERS}: 'ibl' is fast rasterization, 'rt' ray tracing")
    if urdf_version not in URDF_VERSIONS:
        raise ValueError(f"urdf_version={urdf_version!r} is not one of {URDF_VERSIONS}")
    kwargs = dict(
        # "rgbd" makes ManiSkill2_real2sim render cameras and map raw textures to obs["image"][cam]["rgb"].
        obs_mode="rgbd" if render_images else "state_dict",
        robot=GOOGLE_ROBOT,
        control_mode=CONTROL_MODE,
        control_freq=CONTROL_FREQ,
        sim_freq=SIM_FREQ,
        # The overlay keeps only robot and object pixels from the simulator; it needs the segmentation.
        camera_cfgs={"add_segmentation": True},
        rgb_overlay_cameras=[OVERHEAD_CAMERA],
        urdf_version=urdf_version,
        prepackaged_config=False,  # everything it would set is set explicitly here
    )
    if task.kind == "pick":
        kwargs.update(scene_name=COKE_CAN_SCENE, rgb_overlay_path=str(overlay_dir / COKE_CAN_OVERLAY),
                      shader_dir="ibl" if shader == "default" else shader)
    else:
        kwargs.update(scene_name="dummy_drawer", station_name="mk_station_recolor", light_mode="simple",
                      disable_bad_material=True, rgb_overlay_path=str(overlay_dir / DRAWER_STATIONS[station].overlay),
                      shader_dir="rt" if shader == "default" else shader)
    kwargs.update(dict(task.variant_kwargs))
    return kwargs


def reset_options(task: SimplerTask, station: str | None, options: dict | None) -> dict:
    """vla-razor reset options -> SimplerEnv's: {"obj_init_xy": [x, y]} places the can; the robot pose is fixed."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"obj_init_xy"})
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; SimplerEnv tasks accept only 'obj_init_xy'")
    if task.kind == "pick":
        robot = {"init_xy": list(COKE_CAN_ROBOT_XY), "init_rot_quat": base_quaternion(0.0)}
        out = {"robot_init_options": robot, "obj_init_options": {}}
        if "obj_init_xy" in options:
            xy = [float(v) for v in options["obj_init_xy"]]
            if len(xy) != 2:
                raise ValueError(f"obj_init_xy must be [x, y], got {options['obj_init_xy']}")
            out["obj_init_options"]["init_xy"] = xy
        return out
    if "obj_init_xy" in options:
        raise ValueError(f"{task.name} has a fixed cabinet and takes no obj_init_xy; vary the scene with "
                         f"make_task(..., station=...), one of {', '.join(DRAWER_STATIONS)}")
    st = DRAWER_STATIONS[station]
    # Close-drawer envs open the drawer to 0.2 themselves when obj_init_options has no cabinet_init_qpos.
    return {"robot_init_options": {"init_xy": list(st.robot_xy), "init_rot_quat": base_quaternion(st.robot_yaw)},
            "obj_init_options": {}}


def require_simpler():
    """Import SimplerEnv (which registers the ManiSkill2_real2sim env ids); returns mani_skill2_real2sim."""
    try:
        importlib.import_module("simpler_env")
        return importlib.import_module("mani_skill2_real2sim")
    except ImportError as err:
        raise SimplerEnvUnavailableError(f"SimplerEnv is not importable ({err}). {INSTALL_HINT}") from err


def make_simpler_task(
    name: str,
    image_size: int = 128,
    render_images: bool = True,
    max_episode_steps: int | None = None,
    shader: str = "default",
    urdf_version: str = "",
    station: str | None = None,
) -> SimplerObservation:
    """One SimplerEnv task env in visual matching (see the module docstring for the arguments' meaning).

    Episodes terminate on success and truncate at SimplerEnv's limit (80 steps coke can, 113 drawers) or at
    `max_episode_steps`. Raises SimplerEnvUnavailableError when SimplerEnv or its overlay photos are missing.
    """
    task = simpler_task(name)
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    station = resolve_station(task, station)
    real2sim = require_simpler()
    overlay_dir = Path(real2sim.ASSET_DIR) / "real_inpainting"
    kwargs = env_kwargs(task, render_images, shader, urdf_version, station, overlay_dir)
    if not Path(kwargs["rgb_overlay_path"]).is_file():
        raise SimplerEnvUnavailableError(
            f"SimplerEnv's overlay photo {kwargs['rgb_overlay_path']} is missing: set MS2_REAL2SIM_ASSET_DIR to "
            f"the ManiSkill2_real2sim/data folder of your SimplerEnv clone (or install it editable from the clone)")
    import gymnasium as gym

    from envs.observation import SimplerObservation

    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps  # gymnasium.make turns it into the TimeLimit
    env = gym.make(task.env_id, **kwargs)
    return SimplerObservation(env, render_images=render_images, image_size=image_size,
                              reset_options=partial(reset_options, task, station))

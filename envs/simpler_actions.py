"""Action conventions between an OpenVLA-style policy and SimplerEnv's Google robot (pure NumPy).

Two action spaces meet here:

- **policy actions** (what a VLA's tokens decode to): 7-D, dims 0-5 normalized to [-1, 1] with the
  `fractal20220817_data` q01/q99 statistics (xyz delta, then roll-pitch-yaw delta), dim 6 the *absolute*
  gripper target (1 = open, 0 = closed), not normalized. These are OpenVLA's training labels for the RT-1
  (fractal) data.
- **env actions** (what SimplerEnv's Google robot steps on, and what RT-1 emits): 7-D, xyz delta (m),
  axis-angle rotation delta (rad), and a *relative* gripper command (+1 close, -1 open, 0 hold).

Policy -> env follows SimplerEnv's OpenVLA adapter (`simpler_env/policies/openvla/openvla_model.py`):
un-normalize dims 0-5, convert roll-pitch-yaw to axis-angle (transforms3d's static-xyz `euler2axangle`),
and turn the absolute gripper into a relative one that is repeated ("sticky") for 15 steps once it flips.
Env -> policy is the inverse that OpenVLA's data pipeline applies to the fractal data (axis-angle back to
roll-pitch-yaw, `rel2abs_gripper_actions`, q01/q99 normalization with clipping); it turns recorded RT-1
demonstrations into SFT labels.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

FRACTAL_KEY = "fractal20220817_data"
# OpenVLA-7B's norm_stats[FRACTAL_KEY]["action"] (config.json); the gripper entry is 0 / 1 and masked out.
FRACTAL_Q01 = np.array([-0.22453527510166169, -0.14820013284683228, -0.231589707583189,
                        -0.3517994859814644, -0.4193011274933815, -0.43643461108207704])
FRACTAL_Q99 = np.array([0.17824687153100965, 0.14938379630446405, 0.21842354819178575,
                        0.5892666035890578, 0.35272657424211445, 0.44796681255102094])
# The same statistics in OpenVLA's norm_stats layout, for `vla_razor.action_tokens.make_action_tokenizer`.
FRACTAL_NORM_STATS = {FRACTAL_KEY: {"action": {
    "q01": [*FRACTAL_Q01.tolist(), 0.0], "q99": [*FRACTAL_Q99.tolist(), 1.0], "mask": [True] * 6 + [False]}}}
# OpenVLA's (and torchrl's) range epsilon: keeps a constant dimension from dividing by zero.
_RANGE_EPS = 1e-8

STICKY_GRIPPER_REPEAT = 15  # SimplerEnv's OpenVLA adapter, policy_setup="google_robot"
STICKY_GRIPPER_TRIGGER = 0.5  # |relative gripper| above this starts a sticky repeat
REL_GRIPPER_THRESHOLD = 0.1  # OpenVLA's rel2abs_gripper_actions: |a| <= 0.1 means "no change"
GRIPPER_OPEN, GRIPPER_CLOSED = 1.0, 0.0  # absolute policy gripper


def _check_last_dim(name: str, array: np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] != size:
        raise ValueError(f"{name} must have a last dimension of {size}, got shape {array.shape}")
    return array


def unnormalize_fractal(normalized: np.ndarray) -> np.ndarray:
    """[..., 6] policy units in [-1, 1] -> fractal units (m, rad): `0.5 (x + 1)(q99 - q01 + eps) + q01`."""
    normalized = _check_last_dim("normalized", normalized, 6)
    return 0.5 * (normalized + 1.0) * (FRACTAL_Q99 - FRACTAL_Q01 + _RANGE_EPS) + FRACTAL_Q01


def normalize_fractal(actions: np.ndarray) -> np.ndarray:
    """[..., 6] fractal units -> [-1, 1], clipped like OpenVLA's `normalize_action_and_proprio` (q99 bounds)."""
    actions = _check_last_dim("actions", actions, 6)
    return np.clip(2.0 * (actions - FRACTAL_Q01) / (FRACTAL_Q99 - FRACTAL_Q01 + _RANGE_EPS) - 1.0, -1.0, 1.0)


def rpy_to_axis_angle(rpy: np.ndarray) -> np.ndarray:
    """[..., 3] roll-pitch-yaw (static x, then y, then z) -> [..., 3] axis * angle, angle in [0, pi]."""
    rpy = _check_last_dim("rpy", rpy, 3)
    return Rotation.from_euler("xyz", rpy.reshape(-1, 3)).as_rotvec().reshape(rpy.shape)


def axis_angle_to_rpy(rotvec: np.ndarray) -> np.ndarray:
    """[..., 3] axis * angle -> [..., 3] roll-pitch-yaw (static xyz); inverse of `rpy_to_axis_angle`."""
    rotvec = _check_last_dim("rotvec", rotvec, 3)
    return Rotation.from_rotvec(rotvec.reshape(-1, 3)).as_euler("xyz").reshape(rotvec.shape)


def relative_to_absolute_gripper(relative: np.ndarray) -> np.ndarray:
    """[T] relative gripper commands of one episode (+1 close, -1 open) -> [T] absolute (1 open, 0 closed).

    OpenVLA's `rel2abs_gripper_actions`: a step without a command (|a| <= 0.1) keeps the previous state; the
    state before the first command is the opposite of that command (open if nothing ever happens). A relative
    sequence cannot say more: an episode that starts closed and never commands reads as open.
    """
    relative = np.asarray(relative, dtype=np.float64)
    if relative.ndim != 1:
        raise ValueError(f"relative gripper commands must be one episode [T], got shape {relative.shape}")
    # +1 = open, -1 = closed, 0 = no change
    state_of = np.where(relative < -REL_GRIPPER_THRESHOLD, 1, np.where(relative > REL_GRIPPER_THRESHOLD, -1, 0))
    commands = np.flatnonzero(state_of)
    state = -state_of[commands[0]] if len(commands) else 1
    absolute = np.empty(len(relative))
    for t, change in enumerate(state_of):
        state = change if change else state
        absolute[t] = state / 2 + 0.5
    return absolute


class StickyGripper:
    """Absolute gripper targets (1 open, 0 closed) -> the Google robot's relative command, one step at a time.

    SimplerEnv's OpenVLA adapter: relative = previous target - current target (0 on the first step); once
    |relative| > 0.5 that value is sent for 15 consecutive steps, ignoring the policy meanwhile, because the
    relative gripper controller needs a sustained command to finish closing or opening.
    """

    def __init__(self, repeat: int = STICKY_GRIPPER_REPEAT):
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1 step, got {repeat}")
        self.repeat = repeat
        self.reset()

    def reset(self) -> None:
        self.previous: float | None = None
        self.sticky_value = 0.0
        self.sticky_steps = 0  # steps of the current repeat already sent; 0 = not repeating

    def __call__(self, absolute: float) -> float:
        absolute = float(absolute)
        relative = 0.0 if self.previous is None else self.previous - absolute
        self.previous = absolute
        if self.sticky_steps == 0 and abs(relative) > STICKY_GRIPPER_TRIGGER:
            self.sticky_value = relative
        if self.sticky_value != 0.0:
            self.sticky_steps += 1
            relative = self.sticky_value
            if self.sticky_steps == self.repeat:
                self.sticky_value, self.sticky_steps = 0.0, 0
        return relative


class PolicyToSimplerActions:
    """Stateful policy -> env action map for one episode; call `reset()` at every episode start."""

    def __init__(self, sticky_repeat: int = STICKY_GRIPPER_REPEAT):
        self.gripper = StickyGripper(sticky_repeat)

    def reset(self) -> None:
        self.gripper.reset()

    def __call__(self, action: np.ndarray) -> np.ndarray:
        """[7] policy action -> [7] float32 env action (xyz m, axis-angle rad, relative gripper)."""
        action = _check_last_dim("action", action, 7)
        if action.shape != (7,):
            raise ValueError(f"one step at a time: action must have shape (7,), got {action.shape}")
        physical = unnormalize_fractal(action[:6])
        return np.concatenate(
            [physical[:3], rpy_to_axis_angle(physical[3:6]), [self.gripper(action[6])]]
        ).astype(np.float32)


def simpler_to_policy_actions(env_actions: np.ndarray) -> np.ndarray:
    """[T, 7] env actions of one episode (e.g. recorded RT-1 demos) -> [T, 7] policy actions (SFT labels).

    Encode them with the plain 256-bin tokenizer (`make_action_tokenizer()`) to get OpenVLA's training tokens.
    """
    env_actions = _check_last_dim("env_actions", env_actions, 7)
    if env_actions.ndim != 2:
        raise ValueError(f"env_actions must be one episode [T, 7], got shape {env_actions.shape}")
    physical = np.concatenate([env_actions[:, :3], axis_angle_to_rpy(env_actions[:, 3:6])], axis=1)
    gripper = relative_to_absolute_gripper(env_actions[:, 6])
    return np.concatenate([normalize_fractal(physical), gripper[:, None]], axis=1).astype(np.float32)

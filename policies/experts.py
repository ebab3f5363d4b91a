"""Scripted privileged experts for the vla-razor ManiSkill3 tasks.

Each expert is a closed-loop Cartesian controller: every step it reads the simulator's true TCP
and object (can / drawer handle) poses and emits the same 7-D `pd_ee_delta_pose` action a VLA
emits — [dx, dy, dz] (× 0.1 m, base frame = world axes), [rx, ry, rz] (× 0.1 rad), gripper (+1 open,
−1 closed). No motion planner.

Two ManiSkill3 3.0.1 quirks are handled once, in `CartesianServo`:
- the rotation part of `pd_ee_delta_pose` is applied with the opposite sign (the controller scales
  it by the negative lower bound; upstream ManiSkill issue #1469), so the servo negates it;
- on the CPU sim a failed IK solve silently keeps the current joints, so a large command can
  freeze the arm forever; the servo notices "commanded a move, nothing moved" and shrinks the step.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

GRIPPER_OPEN = 1.0
GRIPPER_CLOSED = -1.0
POS_SCALE = 0.1  # metres per unit of action[:3] (Panda pd_ee_delta_pose bound)
ROT_SCALE = 0.1  # radians per unit of action[3:6]
# Rotation sign of pd_ee_delta_pose on ManiSkill 3.0.1 (see module docstring); tests pin it.
ROT_ACTION_SIGN = -1.0


def _base_env(env):
    """The ManiSkill BaseEnv under any gymnasium wrappers."""
    return env.unwrapped


def tcp_position_and_rotation(env) -> tuple[np.ndarray, Rotation]:
    """World TCP position [3] and orientation of the (single, CPU) env."""
    raw = _base_env(env).agent.tcp.pose.raw_pose.reshape(-1, 7)[0].cpu().numpy()
    w, x, y, z = raw[3:]
    return raw[:3].astype(np.float64), Rotation.from_quat([x, y, z, w])


def gripper_down(yaw: float) -> Rotation:
    """Gripper pointing straight down (−z), rotated `yaw` about world z."""
    return Rotation.from_euler("z", yaw) * Rotation.from_euler("x", np.pi)


class CartesianServo:
    """Turns a world-frame TCP target (position, orientation) into one clipped delta action."""

    def __init__(self, pos_gain: float = 1.0, rot_gain: float = 1.0, max_speed: float = 1.0):
        self.pos_gain = pos_gain
        self.rot_gain = rot_gain
        self.max_speed = max_speed  # cap on |action[:3]| per axis; lowered for careful settling
        self._step_scale = 1.0
        self._last_tcp: np.ndarray | None = None
        self._last_command = 0.0

    def reset(self) -> None:
        self._step_scale = 1.0
        self._last_tcp = None
        self._last_command = 0.0

    def action(
        self, env, target_pos: np.ndarray, target_rot: Rotation, gripper: float,
        max_speed: float | None = None,
    ) -> np.ndarray:
        tcp, rot = tcp_position_and_rotation(env)
        self._update_freeze_guard(tcp)
        speed = self.max_speed if max_speed is None else max_speed
        pos = np.clip(self.pos_gain * (target_pos - tcp) / POS_SCALE, -speed, speed)
        rotvec = (target_rot * rot.inv()).as_rotvec()  # world-frame error, radians
        rot_cmd = self.rot_gain * rotvec / ROT_SCALE
        norm = np.linalg.norm(rot_cmd)
        if norm > 1.0:
            rot_cmd = rot_cmd / norm
        pos *= self._step_scale
        rot_cmd *= self._step_scale
        self._last_command = float(np.linalg.norm(pos) * POS_SCALE + np.linalg.norm(rot_cmd) * ROT_SCALE)
        return np.concatenate([pos, ROT_ACTION_SIGN * rot_cmd, [gripper]]).astype(np.float32)

    def _update_freeze_guard(self, tcp: np.ndarray) -> None:
        # A command of > 1 cm(-equivalent) that moved the TCP < 0.5 mm means IK failed and the
        # controller held the joints; halving the step lets IK converge. Progress restores it.
        if self._last_tcp is not None and self._last_command > 0.01:
            moved = np.linalg.norm(tcp - self._last_tcp)
            if moved < 5e-4:
                self._step_scale = max(0.125, self._step_scale * 0.5)
            elif moved > 2e-3:
                self._step_scale = min(1.0, self._step_scale * 2.0)
        self._last_tcp = tcp


class Expert:
    """Scripted privileged policy: `reset(env)` at episode start, then `act(env, obs)` each step."""

    name = "expert"

    def reset(self, env) -> None:
        raise NotImplementedError

    def act(self, env, obs) -> np.ndarray:
        """7-D float32 action for the current state of `env` (obs is accepted for API parity)."""
        raise NotImplementedError


class PickCanExpert(Expert):
    """Hover above the can, settle, descend, close, lift."""

    name = "pick_can_expert"
    hover_above_top = 0.06  # m above the can's top for the approach
    grasp_below_top = 0.035  # TCP this far below the can's top when closing (palm clears the lid)
    settle_tolerance = 0.004  # m xy error before descending: ~7 mm finger clearance per side
    close_steps = 6
    lift_height = 0.12  # m the TCP rises after the grasp (success needs 0.05)

    def __init__(self):
        self.servo = CartesianServo()

    def reset(self, env) -> None:
        self.servo.reset()
        self.phase = "hover"
        self.phase_steps = 0
        _, rot = tcp_position_and_rotation(env)
        # Keep the reset yaw (the can is round) but force the gripper exactly vertical.
        self.grasp_rot = gripper_down(_yaw_of_down_gripper(rot))

    def act(self, env, obs) -> np.ndarray:
        base = _base_env(env)
        can = base.can.pose.p.reshape(-1, 3)[0].cpu().numpy().astype(np.float64)
        top = can[2] + base.can_height / 2
        tcp, _ = tcp_position_and_rotation(env)
        self.phase_steps += 1
        if self.phase == "hover":
            target = np.array([can[0], can[1], top + self.hover_above_top])
            if np.linalg.norm(tcp[:2] - can[:2]) < self.settle_tolerance and abs(tcp[2] - target[2]) < 0.02:
                self._next("descend")
            return self.servo.action(env, target, self.grasp_rot, GRIPPER_OPEN,
                                     max_speed=self._settle_speed(tcp[:2] - can[:2]))
        if self.phase == "descend":
            target = np.array([can[0], can[1], top - self.grasp_below_top])
            if abs(tcp[2] - target[2]) < 0.006:
                self._next("close")
            return self.servo.action(env, target, self.grasp_rot, GRIPPER_OPEN)
        if self.phase == "close":
            if self.phase_steps >= self.close_steps:
                self._next("lift")
                # Straight up from the grasp; fixed here because the can's own top rises with it.
                self.lift_target = tcp + np.array([0.0, 0.0, self.lift_height])
            return self.servo.action(env, tcp, self.grasp_rot, GRIPPER_CLOSED)
        return self.servo.action(env, self.lift_target, self.grasp_rot, GRIPPER_CLOSED)

    def _next(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    @staticmethod
    def _settle_speed(xy_error: np.ndarray) -> float:
        # Full speed far away, slow near the can so the TCP does not overshoot the clearance.
        return 1.0 if np.linalg.norm(xy_error) > 0.03 else 0.3


def _yaw_of_down_gripper(rot: Rotation) -> float:
    """Yaw of a roughly downward gripper: the angle of its x axis in the world xy plane."""
    x_axis = rot.apply([1.0, 0.0, 0.0])
    return float(np.arctan2(x_axis[1], x_axis[0]))


class _DrawerExpert(Expert):
    """Shared drawer-expert plumbing: handle/drawer state and the phase counter.

    The gripper stays closed and pointing down: closed fingers form a hook that goes down between
    the handle bar and the drawer front (open) or in front of the bar (close). A vertical hand
    avoids the Panda wrist limits that block a horizontal grasp at handle height.
    """

    above_handle = 0.10  # m above the bar for the approach
    tcp_below_bar = 0.015  # m; fingertips below the bar, palm still above it
    settle_tolerance = 0.004  # m xy error before descending

    def __init__(self):
        self.servo = CartesianServo()

    def reset(self, env) -> None:
        self.servo.reset()
        self.phase = "above"
        self.phase_steps = 0
        self.down = gripper_down(0.0)  # fingers close along world y: thin along the pull axis

    def _state(self, env) -> tuple[np.ndarray, float, np.ndarray]:
        base = _base_env(env)
        handle = base.handle_position().reshape(-1, 3)[0].cpu().numpy().astype(np.float64)
        opening = float(base.drawer_qpos().reshape(-1)[0])
        tcp, _ = tcp_position_and_rotation(env)
        return handle, opening, tcp

    def _next(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def _approach(self, env, point: np.ndarray, tcp: np.ndarray, next_phase: str) -> np.ndarray:
        """Go above `point`, settle, then descend onto it; switches to `next_phase` when there."""
        if self.phase == "above":
            target = point + np.array([0.0, 0.0, self.above_handle])
            err = np.linalg.norm(tcp[:2] - target[:2])
            if err < self.settle_tolerance and abs(tcp[2] - target[2]) < 0.02:
                self._next("descend")
            return self.servo.action(env, target, self.down, GRIPPER_CLOSED,
                                     max_speed=1.0 if err > 0.03 else 0.3)
        if abs(tcp[2] - point[2]) < 0.006:
            self._next(next_phase)
        return self.servo.action(env, point, self.down, GRIPPER_CLOSED)


class OpenDrawerExpert(_DrawerExpert):
    """Hook closed fingers behind the handle bar from above, then pull the drawer out."""

    name = "open_drawer_expert"
    hook_behind_bar = 0.03  # m from bar centre toward the drawer front (bar back + finger half width)
    # A deep hook and an early descent: a base cloned from the shallow (1.5 cm), tightly settled (4 mm)
    # expert hovered above the bar or let it slip while pulling (15 % open-drawer success on 20 positions).
    tcp_below_bar = 0.03  # m; the palm stays ~1 cm above the bar
    settle_tolerance = 0.01  # m; the bar-to-front gap leaves ~1.2 cm of x slack toward the bar
    pull_distance = 0.21  # m; success needs 0.15
    pull_speed = 0.5  # fraction of the 0.1 m/step bound; faster lets the hook slip off the bar

    def act(self, env, obs) -> np.ndarray:
        handle, opening, tcp = self._state(env)
        self.phase_steps += 1
        # The drawer front faces world −x, so "behind the bar" is +x.
        hook = handle + np.array([self.hook_behind_bar, 0.0, -self.tcp_below_bar])
        if self.phase in ("above", "descend"):
            return self._approach(env, hook, tcp, "pull")
        goal = hook.copy()
        goal[0] = hook[0] + opening - self.pull_distance  # the hook's closed-drawer x, minus the pull
        return self.servo.action(env, goal, self.down, GRIPPER_CLOSED, max_speed=self.pull_speed)


class CloseDrawerExpert(_DrawerExpert):
    """Lower closed fingers in front of the handle bar, then push the drawer shut."""

    name = "close_drawer_expert"
    push_in_front_of_bar = 0.03  # m from bar centre toward the robot
    overshoot = 0.01  # m past fully closed, so the last centimetres still get pushed

    def act(self, env, obs) -> np.ndarray:
        handle, opening, tcp = self._state(env)
        self.phase_steps += 1
        push = handle + np.array([-self.push_in_front_of_bar, 0.0, -self.tcp_below_bar])
        if self.phase in ("above", "descend"):
            return self._approach(env, push, tcp, "push")
        goal = push + np.array([opening + self.overshoot, 0.0, 0.0])
        return self.servo.action(env, goal, self.down, GRIPPER_CLOSED)


EXPERTS: dict[str, type[Expert]] = {
    "pick_can": PickCanExpert,
    "open_drawer": OpenDrawerExpert,
    "close_drawer": CloseDrawerExpert,
}


def make_expert(task: str) -> Expert:
    if task not in EXPERTS:
        raise ValueError(f"no expert for task {task!r}; experts exist for: {', '.join(sorted(EXPERTS))}")
    return EXPERTS[task]()


def run_expert_episode(env, expert: Expert, obj_init_xy, seed: int) -> tuple[bool, int]:
    """Reset `env` (an envs.make_task env) at `obj_init_xy`, run `expert` until the episode ends.

    Returns (success at the end, number of steps).
    """
    obs, info = env.reset(seed=seed, options={"obj_init_xy": [float(v) for v in obj_init_xy]})
    expert.reset(env)
    steps = 0
    while True:
        obs, _, terminated, truncated, info = env.step(expert.act(env, obs))
        steps += 1
        if terminated or truncated:
            return bool(info["success"]), steps

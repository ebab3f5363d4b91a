"""CartesianServo on a fake env: freeze guard and action conventions (no simulator needed)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from policies.experts import ROT_ACTION_SIGN, CartesianServo, gripper_down, make_expert


class FakeEnv:
    """Exposes only what the servo reads: unwrapped.agent.tcp.pose.raw_pose [1, 7] (xyz, wxyz)."""

    def __init__(self, xyz, rotation: Rotation):
        self.pose = SimpleNamespace(raw_pose=None)
        self.unwrapped = SimpleNamespace(agent=SimpleNamespace(tcp=SimpleNamespace(pose=self.pose)))
        self.place(xyz, rotation)

    def place(self, xyz, rotation: Rotation):
        x, y, z, w = rotation.as_quat()
        self.pose.raw_pose = torch.tensor([[*xyz, w, x, y, z]], dtype=torch.float32)


def test_position_error_is_scaled_by_0p1_m_and_clipped():
    env = FakeEnv([0.0, 0.0, 0.2], gripper_down(0.0))
    action = CartesianServo().action(env, np.array([0.03, -0.5, 0.2]), gripper_down(0.0), gripper=1.0)
    np.testing.assert_allclose(action[:3], [0.3, -1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(action[3:6], 0.0, atol=1e-5)
    assert action[6] == 1.0 and action.dtype == np.float32


def test_rotation_command_uses_the_inverted_sign():
    env = FakeEnv([0.0, 0.0, 0.2], gripper_down(0.0))
    target = Rotation.from_euler("z", 0.05) * gripper_down(0.0)  # +0.05 rad about world z
    action = CartesianServo().action(env, np.array([0.0, 0.0, 0.2]), target, gripper=-1.0)
    np.testing.assert_allclose(action[3:6], [0.0, 0.0, ROT_ACTION_SIGN * 0.5], atol=1e-4)


def test_freeze_guard_halves_the_step_until_the_arm_moves_again():
    env = FakeEnv([0.0, 0.0, 0.2], gripper_down(0.0))
    servo = CartesianServo()
    target = np.array([0.5, 0.0, 0.2])
    sizes = [servo.action(env, target, gripper_down(0.0), 1.0)[0] for _ in range(5)]  # arm never moves
    np.testing.assert_allclose(sizes, [1.0, 0.5, 0.25, 0.125, 0.125])
    env.place([0.01, 0.0, 0.2], gripper_down(0.0))  # 1 cm of progress restores the step
    assert servo.action(env, target, gripper_down(0.0), 1.0)[0] == pytest.approx(0.25)
    servo.reset()
    assert servo.action(env, target, gripper_down(0.0), 1.0)[0] == pytest.approx(1.0)


def test_unknown_expert_lists_the_known_ones():
    with pytest.raises(ValueError, match="close_drawer, open_drawer, pick_can"):
        make_expert("stack_cube")

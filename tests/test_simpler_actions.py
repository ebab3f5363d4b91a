"""Policy <-> SimplerEnv action conventions (envs.simpler_actions) against hand-computed values, OpenVLA's
tokenizer un-normalization, transforms3d (what SimplerEnv calls), and a round trip through the tokenizer."""

import numpy as np
import pytest
import torch

from envs.simpler_actions import (
    FRACTAL_KEY,
    FRACTAL_NORM_STATS,
    FRACTAL_Q01,
    FRACTAL_Q99,
    PolicyToSimplerActions,
    StickyGripper,
    axis_angle_to_rpy,
    normalize_fractal,
    relative_to_absolute_gripper,
    rpy_to_axis_angle,
    simpler_to_policy_actions,
    unnormalize_fractal,
)
from vla_razor.action_tokens import make_action_tokenizer

OPEN_TOKEN, CLOSED_TOKEN = 0, 128  # window ids of the gripper labels 1.0 and 0.0


def test_unnormalize_maps_the_ends_and_middle_to_q01_q99_and_their_mean():
    np.testing.assert_allclose(unnormalize_fractal(-np.ones(6)), FRACTAL_Q01, atol=1e-12)
    np.testing.assert_allclose(unnormalize_fractal(np.ones(6)), FRACTAL_Q99, atol=1e-7)
    # x: (0.17824687153100965 + -0.22453527510166169) / 2; roll: (0.5892666035890578 + -0.3517994859814644) / 2
    middle = unnormalize_fractal(np.zeros(6))
    assert middle[0] == pytest.approx(-0.02314420178532602, abs=1e-8)
    assert middle[3] == pytest.approx(0.1187335588037967, abs=1e-8)
    with pytest.raises(ValueError, match="last dimension of 6"):
        unnormalize_fractal(np.zeros(7))


def test_unnormalize_equals_openvla_tokenizer_decoding_with_fractal_stats_on_every_bin():
    ids = torch.arange(256).repeat(7, 1).T  # [256, 7] window ids, every bin in every dimension
    with_stats = make_action_tokenizer(norm_stats=FRACTAL_NORM_STATS, unnorm_key=FRACTAL_KEY).decode(ids).numpy()
    centres = make_action_tokenizer().decode(ids).numpy()
    np.testing.assert_allclose(unnormalize_fractal(centres[:, :6]), with_stats[:, :6], atol=1e-7)
    np.testing.assert_allclose(centres[:, 6], with_stats[:, 6], atol=1e-7)  # the gripper passes through


def test_openvla_policy_actions_through_the_simpler_converter_equal_openvla_decoding_once():
    """An OpenVLA policy hands the env its bin centres (decode_normalized), and the SimplerEnv converter applies the
    fractal statistics: the same robot action as OpenVLA's own decode, un-normalized once, not twice."""
    ids = torch.arange(256).repeat(7, 1).T
    openvla = make_action_tokenizer(norm_stats=FRACTAL_NORM_STATS, unnorm_key=FRACTAL_KEY)
    policy_units = openvla.decode_normalized(ids)
    assert torch.equal(policy_units, make_action_tokenizer().decode(ids))  # stats-free decode, on every bin
    assert policy_units.abs().max() < 1
    np.testing.assert_allclose(unnormalize_fractal(policy_units[:, :6].numpy()), openvla.decode(ids)[:, :6].numpy(),
                               atol=1e-7)


def test_normalize_inverts_unnormalize_and_clips_outliers_like_openvla():
    x = np.random.default_rng(0).uniform(-1, 1, (20, 6))
    np.testing.assert_allclose(normalize_fractal(unnormalize_fractal(x)), x, atol=1e-9)
    np.testing.assert_array_equal(normalize_fractal(FRACTAL_Q99 + 1.0), np.ones(6))
    np.testing.assert_array_equal(normalize_fractal(FRACTAL_Q01 - 1.0), -np.ones(6))


def test_rpy_to_axis_angle_hand_computed():
    np.testing.assert_allclose(rpy_to_axis_angle([0.3, 0.0, 0.0]), [0.3, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(rpy_to_axis_angle([0.0, 0.0, -0.5]), [0.0, 0.0, -0.5], atol=1e-12)
    # R = Rz(0) Ry(pi/2) Rx(pi/2) = [[0, 1, 0], [0, 0, -1], [-1, 0, 0]]: trace 0 -> angle 2pi/3, axis (1, 1, -1)/sqrt(3)
    expected = 2 * np.pi / 3 * np.array([1.0, 1.0, -1.0]) / np.sqrt(3)
    np.testing.assert_allclose(rpy_to_axis_angle([np.pi / 2, np.pi / 2, 0.0]), expected, atol=1e-12)


def test_rpy_to_axis_angle_matches_transforms3d_which_simpler_env_calls():
    euler = pytest.importorskip("transforms3d.euler", reason="transforms3d (SimplerEnv's rotation library) missing")
    rpy = np.random.default_rng(1).uniform(-0.6, 0.6, (50, 3))
    ours = rpy_to_axis_angle(rpy)
    for row, got in zip(rpy, ours):
        axis, angle = euler.euler2axangle(*row)
        np.testing.assert_allclose(got, axis * angle, atol=1e-12)
    np.testing.assert_allclose(axis_angle_to_rpy(ours), rpy, atol=1e-12)


def test_relative_gripper_to_absolute_as_openvla_rel2abs():
    # +1 closes, -1 opens, |a| <= 0.1 holds; before the first command the opposite state
    np.testing.assert_array_equal(relative_to_absolute_gripper([0, 0, 1, 0, 0.05, -1, 0]), [1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(relative_to_absolute_gripper([0, -0.8, 0]), [0, 1, 1])
    np.testing.assert_array_equal(relative_to_absolute_gripper([0.0, 0.09, -0.09]), [1, 1, 1])  # never commanded
    with pytest.raises(ValueError, match="one episode"):
        relative_to_absolute_gripper(np.zeros((2, 3)))


def test_sticky_gripper_repeats_a_flip_for_15_steps_and_ignores_the_policy_meanwhile():
    gripper = StickyGripper()
    targets = [1, 1, 0] + [0, 0, 1, 1] + [1] * 13  # closes at t=2, asks to reopen at t=5 (ignored)
    out = [gripper(t) for t in targets]
    assert out == [0, 0] + [1.0] * 15 + [0, 0, 0]
    gripper.reset()
    assert [gripper(t) for t in (0, 1)] == [0, -1.0]  # after reset the first step is 0 again; opening is -1
    with pytest.raises(ValueError, match="repeat"):
        StickyGripper(0)


def test_policy_to_env_action_composes_unnormalize_rotation_and_sticky_gripper():
    convert = PolicyToSimplerActions()
    first = convert(np.array([1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose(first[:3], [FRACTAL_Q99[0], FRACTAL_Q01[1], (FRACTAL_Q01[2] + FRACTAL_Q99[2]) / 2],
                               atol=1e-6)
    np.testing.assert_allclose(first[3:6], rpy_to_axis_angle((FRACTAL_Q01[3:] + FRACTAL_Q99[3:]) / 2), atol=1e-6)
    assert first[6] == 0.0 and first.dtype == np.float32
    assert convert(np.zeros(7))[6] == pytest.approx(1.0)  # open (1) -> closed (0): close command
    with pytest.raises(ValueError, match="one step at a time"):
        convert(np.zeros((2, 7)))


def test_env_to_policy_actions_hand_computed():
    env_actions = np.array([
        [*FRACTAL_Q01[:3], 0.2, 0.0, 0.0, 0.0],   # roll 0.2 as axis-angle
        [*FRACTAL_Q99[:3], 0.0, 0.0, 0.0, 1.0],   # close
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    policy = simpler_to_policy_actions(env_actions)
    np.testing.assert_allclose(policy[0, :3], -1.0, atol=1e-6)
    np.testing.assert_allclose(policy[1, :3], 1.0, atol=1e-6)
    roll = 2 * (0.2 - -0.3517994859814644) / (0.5892666035890578 - -0.3517994859814644) - 1  # = 0.17302...
    assert policy[0, 3] == pytest.approx(roll, abs=1e-6)
    np.testing.assert_array_equal(policy[:, 6], [1.0, 0.0, 0.0])  # open until the close command, then closed


def test_tokens_survive_policy_to_env_to_policy_round_trip():
    """Training tokens -> decoded policy actions -> env actions (stateful, sticky) -> recorded-demo conversion ->
    tokens again: the SFT labels of a SimplerEnv rollout are the tokens the policy emitted."""
    rng = np.random.default_rng(2)
    steps = 50
    tokens = np.empty((steps, 7), np.int64)
    # window 0 decodes to the top bin centre, which re-encodes to window 1 (OpenVLA's tokenizer is not idempotent
    # at +1), so arm tokens come from 1..255; gripper labels are 1.0 (open) / 0.0 (closed) as in the fractal data
    tokens[:, :6] = rng.integers(1, 256, (steps, 6))
    tokens[:, 6] = [OPEN_TOKEN] * 5 + [CLOSED_TOKEN] * 20 + [OPEN_TOKEN] * 25  # flips 15+ steps apart
    tokenizer = make_action_tokenizer()
    policy_actions = tokenizer.decode(torch.from_numpy(tokens)).numpy()
    convert = PolicyToSimplerActions()
    env_actions = np.stack([convert(a) for a in policy_actions])
    assert env_actions[5, 6] > 0.5 and env_actions[25, 6] < -0.5  # relative close / open commands
    back = tokenizer.encode(torch.from_numpy(simpler_to_policy_actions(env_actions))).numpy()
    np.testing.assert_array_equal(back, tokens)

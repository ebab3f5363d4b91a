"""Placement grids and eval samples: pure NumPy, no simulator needed."""

import numpy as np
import pytest

from envs.placement import eval_positions, grid_positions
from envs.registry import STATE_DIM, STATE_LAYOUT, task_spec


def test_grid_is_x_major_and_hits_the_box_corners():
    grid = grid_positions(3, 2, x_range=(0.0, 0.2), y_range=(-0.1, 0.1))
    expected = np.array([[0.0, -0.1], [0.0, 0.1], [0.1, -0.1], [0.1, 0.1], [0.2, -0.1], [0.2, 0.1]])
    np.testing.assert_allclose(grid, expected)


def test_default_grid_is_10x10_unique_points():
    grid = grid_positions()
    assert grid.shape == (100, 2)
    assert len(np.unique(grid.round(9), axis=0)) == 100


def test_single_point_axis_sits_at_the_middle():
    np.testing.assert_allclose(grid_positions(1, 1, (0.2, 0.4), (-0.1, 0.3)), [[0.3, 0.1]])


def test_eval_positions_are_deterministic_per_seed_and_inside_the_box():
    a = eval_positions(50, x_range=(0.23, 0.27), y_range=(-0.08, 0.08), seed=3)
    b = eval_positions(50, x_range=(0.23, 0.27), y_range=(-0.08, 0.08), seed=3)
    c = eval_positions(50, x_range=(0.23, 0.27), y_range=(-0.08, 0.08), seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == (50, 2)
    assert (a[:, 0] >= 0.23).all() and (a[:, 0] <= 0.27).all()
    assert (a[:, 1] >= -0.08).all() and (a[:, 1] <= 0.08).all()


def test_eval_positions_do_not_touch_the_global_rng():
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    eval_positions(10, seed=1)
    assert np.random.random() == before


@pytest.mark.parametrize(
    "call",
    [
        lambda: grid_positions(0, 3),
        lambda: grid_positions(2, 2, x_range=(0.1, -0.1)),
        lambda: eval_positions(0),
        lambda: eval_positions(5, y_range=(1.0,)),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="close_drawer, open_drawer, pick_can"):
        task_spec("pick_cube")


def test_state_layout_adds_up():
    assert STATE_DIM == sum(n for _, n in STATE_LAYOUT) == 19

import numpy as np
import pytest
import torch

from vla_razor.action_tokens import make_action_tokenizer


def openvla_reference_ids(actions: np.ndarray) -> np.ndarray:
    """OpenVLA's ActionTokenizer as ENVIRONMENT.md states it: 32000 - digitize(clip(a, -1, 1), bins)."""
    bins = np.linspace(-1, 1, 256)
    return 32000 - np.digitize(np.clip(actions, -1, 1), bins)


def openvla_reference_decode(ids: np.ndarray) -> np.ndarray:
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    return centers[np.clip(32000 - ids - 1, 0, 254)]


def test_ids_match_openvla_mapping_including_clipping():
    actions = np.concatenate([np.linspace(-1.5, 1.5, 2001), [-1.0, 1.0, 0.0]]).astype(np.float32)
    tokenizer = make_action_tokenizer(full_vocab_size=32000)
    ids = tokenizer.encode(torch.from_numpy(actions)).numpy()
    np.testing.assert_array_equal(ids, openvla_reference_ids(actions))
    assert ids.min() == 31744 and ids.max() == 31999


def test_higher_action_gets_lower_id():
    tokenizer = make_action_tokenizer(full_vocab_size=32000)
    ids = tokenizer.encode(torch.tensor([-0.9, 0.0, 0.9]))
    assert ids[0] > ids[1] > ids[2]


def test_decode_gives_openvla_bin_centres():
    tokenizer = make_action_tokenizer(full_vocab_size=32000)
    ids = np.arange(31744, 32000)
    decoded = tokenizer.decode(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(decoded, openvla_reference_decode(ids), atol=1e-6)


def test_window_and_full_ids_round_trip():
    full = make_action_tokenizer(full_vocab_size=32000)
    window = make_action_tokenizer()
    actions = torch.rand(5, 7) * 2 - 1
    assert torch.equal(full.to_window_ids(full.encode(actions)), window.encode(actions))
    assert torch.equal(full.to_full_ids(window.encode(actions)), full.encode(actions))
    with pytest.raises(ValueError, match="not action ids"):
        full.to_window_ids(torch.tensor([100]))


def test_nan_action_is_refused_not_encoded_as_a_real_bin():
    tokenizer = make_action_tokenizer(full_vocab_size=32000)
    with pytest.raises(ValueError, match="non-finite"):
        tokenizer.encode(torch.tensor([[0.1, float("nan"), 0.3]]))


def test_norm_stats_unnormalize_dims_but_pass_gripper_through():
    stats = {"fractal": {"action": {"q01": [-0.1] * 6 + [0.0], "q99": [0.3] * 6 + [1.0],
                                    "mask": [True] * 6 + [False]}}}
    tokenizer = make_action_tokenizer(norm_stats=stats, unnorm_key="fractal", full_vocab_size=32000)
    decoded = tokenizer.decode(torch.full((7,), 31872))          # the bin centred at 0.0 in normalized units
    centre = openvla_reference_decode(np.array([31872]))[0]
    expected = 0.5 * (centre + 1) * (0.3 - (-0.1) + 1e-8) - 0.1
    np.testing.assert_allclose(decoded[:6].numpy(), expected, atol=1e-6)
    assert decoded[6].item() == pytest.approx(centre, abs=1e-6)
    with pytest.raises(ValueError, match="unnorm_key"):
        make_action_tokenizer(norm_stats=stats)

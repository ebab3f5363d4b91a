"""The embedded token VLA behind torchrl's VLA base and the shared interface; the robot path's pure pieces."""
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from policies.vla_factory import PolicyConfig, build_policy, load_policy, save_policy
from policies.vla_model import VLAModelConfig
from vla_razor.distributed import PolicyForward
from vla_razor.optim import make_adamw
from vla_razor.vla_train import (kl_to_base, per_trajectory, policy_gradient_update,
                                 trajectory_index)
from vla_razor.video import annotate, tile, upscale, write_video

INSTRUCTIONS = ["pick coke can", "open top drawer"]


def tiny_config(**kwargs) -> PolicyConfig:
    model = VLAModelConfig(image_size=32, patch_size=16, vision_hidden=16, vision_layers=1, hidden=32, layers=2,
                           heads=2, intermediate=64)
    return PolicyConfig(model=model, state_differences=[[16, 9]], **kwargs)


def batch(n: int, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict({
        "observation": {"image": torch.randint(0, 256, (n, 3, 48, 48), dtype=torch.uint8, generator=g),
                        "state": torch.randn(n, 19, generator=g)},
        "language_instruction": NonTensorStack(*[INSTRUCTIONS[i % 2] for i in range(n)]),
    }, batch_size=[n])


@pytest.fixture()
def policy():
    torch.manual_seed(0)
    policy = build_policy(tiny_config(), INSTRUCTIONS)
    policy.set_proprio_stats(torch.randn(64, 19))
    return policy


def test_rollout_step_writes_tokens_actions_and_matching_log_probs(policy):
    out = policy(batch(5))
    tokens = out["vla_action", "tokens"]
    assert tokens.shape == (5, 1, 7) and tokens.min() >= 0 and tokens.max() < 256
    torch.testing.assert_close(out["action"], policy.action_tokenizer.decode(tokens)[:, 0])
    # the sampler's log-probs are the tempered action-restricted policy's: one teacher-forced forward agrees
    teacher = policy.token_log_probs(out, tokens.reshape(5, 7))
    torch.testing.assert_close(teacher, out["vla_action", "log_probs"].reshape(5, 7), atol=1e-5, rtol=0)
    logits = policy.token_logits(out)
    assert logits.shape == (5, 7, 256)
    torch.testing.assert_close(torch.log_softmax(logits, -1).gather(-1, tokens.reshape(5, 7, 1)).squeeze(-1),
                               teacher)


def test_proprio_appends_object_minus_gripper(policy):
    state = torch.arange(19, dtype=torch.float32).unsqueeze(0)
    features = policy.proprio_features(state)
    assert features.shape == (1, 22)
    torch.testing.assert_close(features[0, 19:], state[0, 16:19] - state[0, 9:12])


def test_save_load_round_trip_gives_the_same_policy(policy, tmp_path):
    path = save_policy(tmp_path / "policy.pt", policy, tiny_config(), extra={"algo": "sft"})
    loaded, cfg, extra = load_policy(path)
    assert extra == {"algo": "sft"} and cfg.state_differences == [[16, 9]]
    b = batch(3)
    b["vla_action", "tokens"] = torch.randint(0, 256, (3, 7))
    torch.testing.assert_close(loaded.token_logits(b), policy.token_logits(b))


def test_kl_to_base_is_zero_for_a_copy_and_positive_after_an_update(policy):
    probe = batch(6, seed=1)
    tuned = policy.frozen_copy()
    assert kl_to_base(tuned, policy, probe) == 0.0
    with torch.no_grad():
        tuned.model.lm_head.weight.add_(0.05 * torch.randn_like(tuned.model.lm_head.weight))
    assert kl_to_base(tuned, policy, probe) > 0.0


def trajectories(n: int = 4, steps: int = 3) -> tuple[TensorDict, torch.Tensor]:
    """A flat collector batch (``traj_format="cat"``) of n trajectories of up to ``steps`` steps, and its
    per-step trajectory index (trajectory 0 has 2 steps, 1 has 1, the others 3)."""
    lengths = [2, 1] + [steps] * (n - 2)
    flat = batch(sum(lengths), seed=2)
    flat["vla_action", "tokens"] = torch.randint(0, 256, (sum(lengths), 7), generator=torch.Generator().manual_seed(3))
    flat["collector", "traj_ids"] = torch.repeat_interleave(torch.arange(10, 10 + n), torch.tensor(lengths))
    return flat, trajectory_index(flat)


def test_trajectory_index_and_per_trajectory_reductions():
    steps = TensorDict({("collector", "traj_ids"): torch.tensor([7, 7, 3, 9, 9, 9])}, batch_size=[6])
    index = trajectory_index(steps)
    assert index.tolist() == [0, 0, 1, 2, 2, 2]
    assert per_trajectory(torch.tensor([False, True, False, False, False, True]), index, "any").tolist() == \
        [True, False, True]
    assert per_trajectory(torch.tensor([5, 6, 7, 8, 9, 10]), index, "first").tolist() == [5, 7, 8]


def test_minibatched_policy_gradient_equals_the_full_batch(policy):
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    grads = []
    for minibatch in (100, 2):
        model = policy.frozen_copy()
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = make_adamw(model.parameters(), lr=0.0)
        stats = policy_gradient_update(PolicyForward(model), *trajectories(), rewards, optimizer, objective="reinforce",
                                       minibatch_steps=minibatch, max_grad_norm=1e9)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert stats["reward_mean"] == 0.5
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_behaviour_log_prob_gap_is_zero_on_policy_and_grows_with_stale_weights(policy):
    """The update reports how far the rollout's recorded log-probs are from the learner's: ~0 when the rollout
    ran the learner's weights, clearly positive when it ran older ones (a collector copy that missed a sync)."""
    rollout = policy(batch(6, seed=4))  # 6 one-step trajectories sampled by `policy`
    rollout["collector", "traj_ids"] = torch.arange(6)
    index, rewards = trajectory_index(rollout), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    gaps = []
    for shift in (0.0, 0.3):
        learner = policy.frozen_copy()
        with torch.no_grad():
            learner.model.lm_head.weight.add_(shift * torch.randn_like(learner.model.lm_head.weight))
        for p in learner.parameters():
            p.requires_grad_(True)
        stats = policy_gradient_update(PolicyForward(learner), rollout, index, rewards,
                                       make_adamw(learner.parameters(), lr=0.0), objective="reinforce")
        gaps.append(stats["behaviour_log_prob_gap"])
    assert gaps[0] < 1e-5 < 1e-2 < gaps[1]


def test_policy_gradient_raises_the_successful_trajectories_log_prob(policy):
    model = policy.frozen_copy()
    for p in model.parameters():
        p.requires_grad_(True)
    data, index = trajectories()
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    valid = data[index == 0]

    def logp():
        with torch.no_grad():
            return model.token_log_probs(valid, valid["vla_action", "tokens"]).sum()

    before = logp()
    optimizer = make_adamw(model.parameters(), lr=1e-3)
    for _ in range(3):
        policy_gradient_update(PolicyForward(model), data, index, rewards, optimizer, objective="reinforce")
    assert logp() > before


def test_video_tiles_annotates_and_decodes(tmp_path):
    short = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    long = np.stack([np.full((16, 16, 3), 60 + 40 * i, dtype=np.uint8) for i in range(5)])  # distinct frames
    grid = tile([short, long, short])
    assert grid.shape == (5, 32, 32, 3)
    assert (grid[4, :16, :16] == 0).all()          # short clip holds its last frame
    clip = annotate(upscale(long, 4), "pick coke can", success=False)
    assert clip.shape == (5, 64, 64, 3) and tuple(clip[0, 63, 32]) == (220, 50, 40)   # red failure border
    for name in ("v.mp4", "v.gif"):
        path = write_video(tmp_path / name, clip, fps=5)
        frames = imageio.mimread(path)
        assert len(frames) == 5 and np.asarray(frames[0]).shape[:2] == (64, 64)
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        write_video(tmp_path / "v.avi", clip)

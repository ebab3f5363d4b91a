import copy

import pytest
import torch

from envs import llm_synthetic
from vla_razor import llm
from vla_razor.divergences import kl_base_to_policy_per_position

from test_llm_policy import tiny_policy


def test_step_indices_cover_each_prompt_once_per_epoch_across_step_boundaries():
    steps = [llm.step_indices(step, batch=4, num_prompts=10, seed=3) for step in range(5)]   # 2 epochs
    flat = torch.cat(steps)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:20])                   # a fresh order each epoch
    assert torch.equal(llm.step_indices(3, 4, 10, 3), steps[3])      # a pure function of the step: resumable


def test_reduce_divergences_hand_computed():
    # 2 prompts x 2 responses: per-response sums and token counts
    sums = {"kl_base_to_policy": torch.tensor([1.0, 3.0, 0.0, 2.0]), "kl_policy_to_base": torch.zeros(4),
            "total_variation": torch.zeros(4), "l2_distance": torch.zeros(4),
            "kl_base_to_policy_mc": torch.tensor([2.0, 2.0, 0.0, 0.0]), "tokens": torch.tensor([1.0, 3.0, 2.0, 2.0])}
    out = llm.reduce_divergences(sums, group_size=2)
    assert out["kl_base_to_policy"] == pytest.approx(((1 + 3) / 4 + (0 + 2) / 4) / 2)   # per token, per prompt
    assert out["kl_base_to_policy_seq"] == pytest.approx(1.5)
    assert out["kl_base_to_policy_mc_seq"] == pytest.approx(1.0)


def test_sequence_divergences_sum_the_shared_per_position_kl_over_real_tokens():
    torch.manual_seed(0)
    base, policy = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    tokens = torch.randint(7, (3, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    sums = llm.sequence_divergences(policy, base, tokens, mask)
    expected = (kl_base_to_policy_per_position(base, policy) * mask).sum(-1)
    torch.testing.assert_close(sums["kl_base_to_policy"], expected)
    assert sums["tokens"].tolist() == [2.0, 4.0, 1.0]


@pytest.mark.parametrize("objective, aggregation, mu", [("grpo", "dr_grpo", 1), ("grpo", "token_mean", 2),
                                                       ("reinforce_1_0", "sequence_mean", 1),
                                                       ("reinforce", "dr_grpo", 2)])
def test_micro_batched_update_equals_the_whole_batch_update(objective, aggregation, mu):
    torch.set_num_threads(1)
    policy = tiny_policy()
    task = llm_synthetic.parity_prompt_set(8, seed=0)
    ro = llm.rollout(policy, task, torch.arange(3), group_size=4, max_new_tokens=3,
                     generator=torch.Generator().manual_seed(0))
    ro.rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0])   # every group has a signal
    results = []
    for micro_batch in (0, 5):        # 5 splits groups: advantages must still come from the whole batch
        trained = copy.deepcopy(policy)
        algo = llm.AlgoConfig(objective=objective, group_size=4, mu=mu, aggregation=aggregation,
                              micro_batch=micro_batch, max_grad_norm=1e9)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
        stats = llm.on_policy_update(trained, policy.frozen_copy(), optimizer, algo, ro, lambda _: 0.5, 0)
        results.append((torch.nn.utils.parameters_to_vector(trained.parameters()), stats))
    (whole, whole_stats), (micro, micro_stats) = results
    moved = whole - torch.nn.utils.parameters_to_vector(policy.parameters())
    assert moved.abs().max() > 1e-4
    torch.testing.assert_close(micro, whole, atol=1e-6, rtol=1e-5)
    assert whole_stats["kl/kl_base_to_policy"] == 0.0                 # measured before the first update
    assert micro_stats["kl/kl_base_to_policy"] == 0.0


def test_gradient_checkpointing_acts_in_updates_and_sampling_keeps_its_cache():
    """policy.gradient_checkpointing=true recomputes the layers in the update's backward (a model loaded with
    from_pretrained is in eval mode, where transformers skips checkpointing), and responses drawn afterwards, in
    training mode, are those of the same weights in eval mode (the KV-cached decode must not lose its cache)."""
    torch.set_num_threads(1)
    policy = tiny_policy()
    policy.model.eval()
    policy.model.gradient_checkpointing_enable()
    recomputed = []
    for layer in policy.model.model.layers:
        checkpointed = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, f=checkpointed, **kw: recomputed.append(1) or f(*args, **kw)
    task = llm_synthetic.parity_prompt_set(8, seed=0)
    ro = llm.rollout(policy, task, torch.arange(2), group_size=2, max_new_tokens=3,
                     generator=torch.Generator().manual_seed(0))
    ro.rewards = torch.tensor([1.0, 0, 0, 1])
    assert not recomputed  # rollouts decode without it
    algo = llm.AlgoConfig(objective="grpo", group_size=2, max_grad_norm=1e9)
    llm.on_policy_update(policy, None, torch.optim.SGD(policy.parameters(), lr=0.5), algo, ro, lambda _: 0.5, 0)
    assert len(recomputed) == len(policy.model.model.layers)
    assert policy.model.training
    batch = policy.encode_prompts(["parity 7 ?", "next 12 ?"])
    drawn = policy.sample_tokens(batch, generator=torch.Generator().manual_seed(1), max_new_tokens=4)
    evaluated = copy.deepcopy(policy).eval()
    assert torch.equal(drawn, evaluated.sample_tokens(batch, generator=torch.Generator().manual_seed(1),
                                                      max_new_tokens=4))


def test_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="group_size=1 with objective=grpo"):
        llm.validate_algo(llm.AlgoConfig(group_size=1))
    with pytest.raises(ValueError, match="algo.mu=2 .* 'sft'"):
        llm.validate_algo(llm.AlgoConfig(objective="sft", mu=2))
    with pytest.raises(KeyError, match="known objectives"):
        llm.validate_algo(llm.AlgoConfig(objective="ppo"))

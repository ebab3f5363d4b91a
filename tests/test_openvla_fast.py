"""CPU tests for policies/openvla_fast.py and policies/fast_kernels.py on a tiny random Llava (seconds)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from policies import fast_kernels as fk  # noqa: E402
from policies.openvla_fast import (  # noqa: E402
    action_token_log_probs,
    reinforce_loss,
    sample_action_tokens,
)

ACTION_IDS = torch.arange(31744, 32000)
IMAGE_TOKEN = 32000
N_IMG = 16  # (56 / 14) ** 2


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14)
    txt = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32064, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vis, text_config=txt, image_token_index=IMAGE_TOKEN,
                      vision_feature_select_strategy="full", image_seq_length=N_IMG)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg).float().eval()


def _prompt(batch, seed, n_text=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, N_IMG), IMAGE_TOKEN),
                     torch.randint(100, 31000, (batch, n_text), generator=g)], 1)
    return torch.randn(batch, 3, 56, 56, generator=g), ids, torch.ones_like(ids)


def _left_pad(ids, mask, pad):
    z = torch.zeros(ids.shape[0], pad, dtype=torch.long)
    return torch.cat([z, ids], 1), torch.cat([z, mask], 1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_in_action_set_and_log_probs_match_teacher_forcing(model, temperature):
    pix, ids, mask = _prompt(3, seed=1)
    ids, mask = _left_pad(ids, mask, 2)
    mask[0, :2] = 1  # row 0: no padding (filler tokens), rows 1-2: two pads
    ids[0, :2] = 7
    tokens, lp_sample = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, temperature=temperature,
                                             generator=torch.Generator().manual_seed(0))
    assert tokens.shape == lp_sample.shape == (3, 7)
    assert torch.isin(tokens, ACTION_IDS).all()
    with torch.no_grad():
        lp_tf, logits = action_token_log_probs(model, pix, torch.cat([ids, tokens], 1),
                                               torch.cat([mask, torch.ones_like(tokens)], 1), ACTION_IDS,
                                               temperature=temperature)
    assert logits.shape == (3, 7, 256)
    torch.testing.assert_close(lp_sample, lp_tf, atol=1e-4, rtol=0)


def test_many_draws_stay_in_action_set(model):
    pix, ids, mask = _prompt(8, seed=2)
    for seed in range(3):
        tokens, _ = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(seed))
        assert bool(((tokens >= 31744) & (tokens <= 31999)).all())


def test_left_padding_invariance(model):
    pix, ids, mask = _prompt(2, seed=3)
    actions = ACTION_IDS[torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        ref, _ = action_token_log_probs(model, pix, torch.cat([ids, actions], 1),
                                        torch.ones(2, ids.shape[1] + 7, dtype=torch.long), ACTION_IDS)
        for pad in (1, 4):
            ids_p, mask_p = _left_pad(torch.cat([ids, actions], 1), torch.ones(2, ids.shape[1] + 7, dtype=torch.long), pad)
            got, _ = action_token_log_probs(model, pix, ids_p, mask_p, ACTION_IDS)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # and the sampler: same draws (same generator) with and without padding give the same log-probs
    t0, l0 = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(5))
    ids_p, mask_p = _left_pad(ids, mask, 3)
    t1, l1 = sample_action_tokens(model, pix, ids_p, mask_p, ACTION_IDS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t0, t1)
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_write", ["eager", "compiled"])
def test_static_kv_cache_matches_dynamic_cache(model, monkeypatch, kv_write):
    from policies import openvla_fast

    monkeypatch.setattr(openvla_fast, "KV_WRITE", kv_write)  # "compiled": inductor writes the prefill (~5 s on CPU)
    pix, ids, mask = _prompt(3, seed=11)
    ids, mask = _left_pad(ids, mask, 2)
    mask[0, :2] = 1
    t_s, l_s = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(3))
    t_d, l_d = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(3),
                                    kv_cache="dynamic")
    assert torch.equal(t_s, t_d)
    torch.testing.assert_close(l_s, l_d, atol=1e-6, rtol=0)
    # scoring given tokens through the same prefill + decode path reproduces the draw's log-probs
    t_f, l_f = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, tokens=t_s)
    assert torch.equal(t_f, t_s)
    torch.testing.assert_close(l_f, l_s, atol=1e-6, rtol=0)


@pytest.mark.parametrize("first", ["math", "flash"])
def test_attention_first_orders_the_sampler_kernels_and_keeps_its_draws(model, monkeypatch, first):
    from torch.nn.attention import SDPBackend

    from policies import openvla_fast

    pix, ids, mask = _prompt(3, seed=12)
    ref = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(6))
    seen = []  # the kernel order each attention call of the sampler ran under
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(openvla_fast, "ATTENTION_FIRST", first)
    got = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(6))
    want = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[first]
    # vision (2) + prefill (2) + 6 decode steps x 2 text layers
    assert len(seen) == 16 and set(seen) == {int(want)}
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=0)
    monkeypatch.setattr(openvla_fast, "ATTENTION_FIRST", "fastest")
    with pytest.raises(ValueError, match="ATTENTION_FIRST"):
        sample_action_tokens(model, pix, ids, mask, ACTION_IDS)


def test_preallocated_cache_writes_in_place_and_guards_overflow():
    from policies.openvla_fast import PreallocatedKVCache

    cache = PreallocatedKVCache(num_layers=2, max_len=5)
    k = torch.randn(2, 3, 4, 8)
    v = torch.randn(2, 3, 4, 8)
    keys, values = cache.update(k, v, 0)
    assert keys.shape == (2, 3, 4, 8) and cache.get_seq_length(0) == 4
    buf = cache.layers[0]._k
    k1, v1 = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    keys, values = cache.update(k1, v1, 0)
    assert keys.data_ptr() == buf.data_ptr()  # a view of the one buffer, no new allocation
    torch.testing.assert_close(keys, torch.cat([k, k1], -2), atol=0, rtol=0)
    torch.testing.assert_close(values, torch.cat([v, v1], -2), atol=0, rtol=0)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(k1, v1, 0)


def test_log_probs_match_full_vocab_reference(model):
    pix, ids, mask = _prompt(2, seed=6)
    actions = ACTION_IDS[torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(7))]
    full = torch.cat([ids, actions], 1)
    with torch.no_grad():
        got, _ = action_token_log_probs(model, pix, full, torch.ones_like(full), ACTION_IDS)
        logits = model(pixel_values=pix, input_ids=full, attention_mask=torch.ones_like(full)).logits
    ref = torch.log_softmax(logits[:, -8:-1][..., ACTION_IDS], -1).gather(-1, (actions - 31744).unsqueeze(-1))
    torch.testing.assert_close(got, ref.squeeze(-1), atol=1e-5, rtol=0)


def test_non_action_token_is_rejected(model):
    pix, ids, mask = _prompt(1, seed=8)
    bad = torch.cat([ids, torch.full((1, 7), 500)], 1)
    with pytest.raises(ValueError, match="not among"):
        action_token_log_probs(model, pix, bad, torch.ones_like(bad), ACTION_IDS)


def test_reinforce_loss_hand_computed():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = reinforce_loss(lp, adv)
    assert loss.item() == pytest.approx(-(2.0 * -3.0 + -1.0 * -1.0) / 2)
    with pytest.raises(ValueError):
        reinforce_loss(lp, torch.ones(3))


@pytest.mark.parametrize("min_rows", [0, 10**9])
def test_fused_llama_ops_match_eager(model, min_rows):
    pix, ids, mask = _prompt(2, seed=9)
    with torch.no_grad():
        ref = model(pixel_values=pix, input_ids=ids, attention_mask=mask).logits
        fk.enable_fused_llama_ops(True, compile=False, min_rows=min_rows)
        try:
            got = model(pixel_values=pix, input_ids=ids, attention_mask=mask).logits
        finally:
            fk.enable_fused_llama_ops(False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("low_rank_first", [False, True])
def test_fused_lora_matches_peft(model, monkeypatch, low_rank_first):
    monkeypatch.setattr(fk, "LORA_LOW_RANK_FIRST", low_rank_first)
    peft = pytest.importorskip("peft")
    import copy

    m = copy.deepcopy(model)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    pix, ids, mask = _prompt(2, seed=10)
    full = torch.cat([ids, ACTION_IDS[:7].expand(2, 7)], 1)

    def run():
        for p in params:
            p.grad = None
        lp, _ = action_token_log_probs(pm, pix, full, torch.ones_like(full), ACTION_IDS)
        reinforce_loss(lp, torch.tensor([1.0, -0.5]))[0].backward()
        return lp.detach(), [p.grad.clone() for p in params]

    lp_ref, g_ref = run()
    assert fk.fuse_lora_linears(pm) == 6
    lp_f, g_f = run()
    fk.unfuse_lora_linears(pm)
    torch.testing.assert_close(lp_f, lp_ref, atol=1e-6, rtol=0)
    for a, b in zip(g_f, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("low_rank_first,grad_split", [(False, 1), (True, 1), (False, 4), (False, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_compiled_lora_linear_matches_eager_and_copies_no_output(monkeypatch, low_rank_first, grad_split, with_bias):
    """Under torch.compile the in-place accumulate must stay in place: a functionalised ``addmm`` copies the
    whole [N, out] accumulator first (one copy per projection, forward and backward). Every GEMM order and
    gradient split gives the same values, compiled or not."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(fk, "LORA_LOW_RANK_FIRST", low_rank_first)
    monkeypatch.setattr(fk, "LORA_GRAD_SPLIT", grad_split)
    g = torch.Generator().manual_seed(11)
    n_rows, d_in, d_out, r = 48, 32, 40, 4
    weight = torch.randn(d_out, d_in, generator=g) / 6
    bias = torch.randn(d_out, generator=g) if with_bias else None
    x = torch.randn(2, n_rows // 2, d_in, generator=g)
    a, b = torch.randn(r, d_in, generator=g) / 6, torch.randn(d_out, r, generator=g) / 2

    def loss(x, a, b):
        return fk._LoRALinearFn.apply(x, weight, bias, a, b, 0.5).sin().sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        value = fn(*leaves)
        value.backward()
        return [value.detach()] + [t.grad for t in leaves]

    def output_copies(fn) -> int:  # copies of an [N, out] / [N, in] tensor in one forward + backward
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            grads(fn)
        return sum(ev.count for ev in prof.key_averages(group_by_input_shape=True)
                   if ev.key == "aten::copy_" and ev.input_shapes and ev.input_shapes[0] in ([n_rows, d_out], [n_rows, d_in]))

    with monkeypatch.context() as plain:  # the plain order and reduction, eager: the reference values
        plain.setattr(fk, "LORA_LOW_RANK_FIRST", False)
        plain.setattr(fk, "LORA_GRAD_SPLIT", 1)
        want = grads(loss)
    compiled = torch.compile(loss, fullgraph=True)
    for fn in (compiled, loss):
        for got, ref in zip(grads(fn), want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # eager copies only where the CPU kernel broadcasts a bias into its output (CUDA adds it in the epilogue)
    assert output_copies(compiled) == output_copies(loss) == (1 if with_bias else 0)


@pytest.mark.parametrize("pad,lora", [(0, False), (2, False), (0, True)])
def test_residual_adds_in_gemm_epilogue_keep_the_sampler(model, monkeypatch, pad, lora):
    from policies import openvla_fast

    if lora:  # o_proj and down_proj as fused LoRA linears (the product's LoRA rollouts)
        peft = pytest.importorskip("peft")
        import copy

        model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*language_model.*\.(q_proj|o_proj|down_proj)"))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        assert fk.fuse_lora_linears(model) == 6
    o_proj_forward = fk.decoder_layers(model)[0].self_attn.o_proj.__dict__.get("forward")
    pix, ids, mask = _prompt(3, seed=12)
    if pad:
        ids, mask = _left_pad(ids, mask, pad)
        mask[0, :pad] = 1
    fused = []
    accumulate = fk._accumulate_linear
    monkeypatch.setattr(fk, "_accumulate_linear", lambda *a: fused.append(accumulate(*a)) or fused[-1])
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(openvla_fast, "RESIDUAL_EPILOGUE", on)
        runs[on] = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-5, rtol=0)
    # o_proj and down_proj of every layer but the trimmed last one, in the prefill only
    assert fused == [True] * 2 * (len(fk.decoder_layers(model)) - 1)
    # every forward restored: the layer's (the class's) and o_proj's (the class's, or the fused LoRA one)
    layer = fk.decoder_layers(model)[0]
    assert "forward" not in layer.__dict__
    assert layer.self_attn.o_proj.__dict__.get("forward") is o_proj_forward


def test_trimmed_last_layer_gives_the_same_log_probs_and_gradients(model):
    from policies.openvla_fast import _body, last_layer_rows

    m = model.double()
    try:
        pix, ids, mask = _prompt(3, seed=4)
        ids, mask = _left_pad(ids, mask, 2)
        mask[0, :2] = 1
        pix = pix.double()
        g = torch.Generator().manual_seed(2)
        tokens, lp_trim = sample_action_tokens(m, pix, ids, mask, ACTION_IDS, generator=g, trim_last_layer=True)
        _, lp_full = sample_action_tokens(m, pix, ids, mask, ACTION_IDS, tokens=tokens, trim_last_layer=False)
        assert torch.allclose(lp_trim, lp_full, atol=1e-10)

        full_ids, full_mask = torch.cat([ids, tokens], 1), torch.cat([mask, torch.ones_like(tokens)], 1)
        adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
        grads = {}
        for trim in (True, False):
            m.zero_grad(set_to_none=True)
            lp, _ = action_token_log_probs(m, pix, full_ids, full_mask, ACTION_IDS, trim_last_layer=trim)
            reinforce_loss(lp, adv)[0].backward()
            grads[trim] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        assert torch.allclose(lp, lp_trim, atol=1e-10)
        assert grads[True].keys() == grads[False].keys()
        for name in grads[True]:
            assert torch.allclose(grads[True][name], grads[False][name], atol=1e-10), name

        rows = []  # the last layer's MLP sees only the kept positions; earlier layers see all of them
        layers = [mod for mod in _body(m).modules() if type(mod).__name__.endswith("DecoderLayer")]
        with torch.no_grad(), last_layer_rows(_body(m), 8, full_ids.shape[1]):  # hooks run in registration order: count after slicing
            hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[1]))
                     for layer in layers]
            _body(m)(pixel_values=pix, input_ids=full_ids, attention_mask=full_mask, use_cache=False)
        for h in hooks:
            h.remove()
        assert rows == [full_ids.shape[1]] * (len(layers) - 1) + [8]
    finally:
        m.zero_grad(set_to_none=True)
        model.float()


def test_contiguous_vision_embeddings_change_no_value(model):
    """transformers' SigLIP embeddings are a transposed view whose layout the residual stream would keep; made
    contiguous, the tower gives bit-identical features."""
    tower = model.model.vision_tower
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    embeddings = next(m for m in tower.modules() if type(m).__name__ == "SiglipVisionEmbeddings")
    with torch.no_grad():
        assert not embeddings(pix).is_contiguous()
        want = tower(pix).last_hidden_state
        handles = fk.contiguous_patch_embeddings(model)
        try:
            assert len(handles) == 1 and embeddings(pix).is_contiguous()
            got = tower(pix).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
    assert torch.equal(got, want)

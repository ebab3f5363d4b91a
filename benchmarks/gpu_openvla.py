"""GPU benchmark (issue 6): OpenVLA-7B-shaped Llava policy, random bf16 weights, ours vs naive HF.

Measures, each beside the naive transformers baseline in the same process (run 2 layout; run 1's
teacher-forced log-prob rows and uncompiled training rows are in benchmarks/results/gpu_openvla_h200.md):
  (a) action sampling (actions/s = samples/s, one action = 7 tokens) at batch 1/64/128/256:
      naive ``model.generate(max_new_tokens=7, do_sample=True)`` vs ``sample_action_tokens`` with the
      pre-allocated in-place KV cache (fused element-wise ops compiled only for inputs >= 2048 rows,
      so decode steps and batch-1 prefill run eager); optional rows at b256 (residual adds in the GEMM
      epilogue, cuBLASLt GEMMs, flash attention first, compiled KV write, SigLIP layers compiled), and b512
      with whichever of them was faster;
  (c) full fine-tune REINFORCE update at batch 32/48/64: naive (full-vocab logits, default AdamW, b32)
      vs ours (action head, fused ops, regionally compiled decoder layers, fused AdamW);
      extra at b64: cuBLASLt GEMMs, SigLIP layers compiled, static-shape compile;
  (d) LoRA r=32 on all linear layers (peft ``target_modules="all-linear"``: vision tower, projector and
      language model; OpenVLA's finetune.py recipe and ENVIRONMENT.md's naive 29.1/s; runs 1-6 adapted the
      language model only), batch 32/64: naive peft (b32) vs ours (fused LoRA + compiled decoder layers);
      optional rows at b64 (rank-r product first, adapter gradients split k ways with the k the rank-r
      diagnosis timed fastest, cuBLASLt GEMMs, SigLIP layers compiled, static-shape compile), and b80 with
      whichever of them was faster.
Correctness first: ours and naive HF, each against an fp32 copy of the model (fp64 with --tiny),
on one small batch; ours must be no farther from the reference than naive (see check_against_reference).

MFU convention (the issue's): model FLOPs per sample = c * P * S with P = all parameters
(7.19e9 here), S = 284 tokens per sample (256 image + 21 text + 7 action), c = 2 for a forward
(sampling counts its prefill + decode tokens, 284 in all), 6 for a full fine-tune step, 4 for a
LoRA step (forward + activation gradients; weight gradients of the adapters are negligible);
MFU = samples/s * FLOPs/sample / 790e12 (bf16 dense matmul peak measured on an H200; also used
on H100). Ceilings at 100% MFU: forward 194 samples/s, full fine-tune 65, LoRA 97.

Usage: python benchmarks/gpu_openvla.py [--tiny] [--budget-s 420] [--out DIR]
``--tiny`` runs tiny dims on CPU in seconds and checks correctness against an fp64 reference (tokens
in the action set, sampler and teacher-forced log-probs, left padding, fused ops, fused LoRA).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies import fast_kernels as fk  # noqa: E402
from policies import openvla_fast  # noqa: E402
from vla_razor.optim import make_adamw  # noqa: E402
from policies.openvla_fast import (  # noqa: E402
    ReinforceBatch,
    _cache_from,
    _cache_kwarg,
    position_ids_from_mask,
    action_token_log_probs,
    clear_decode_graphs,
    reinforce_loss,
    reinforce_step,
    sample_action_tokens,
    tokens_to_action_index,
)

PEAK_FLOPS = 790e12
# Time guards (s): a row starts only if the time left covers it and what must still run after it.
LORA_LARGEST = 80  # all-linear LoRA keeps the vision tower's activations (~0.24 GB a sample): b96 (123 GiB LM-only) won't fit
RESERVE_LORA_LARGEST = 25  # the LoRA batch-80 row (the best LoRA figure)
LORA_ESSENTIAL = 60  # the LoRA rows the targets need: check, naive b32, ours b32 (compiles), b64, b80
RESERVE_LORA = LORA_ESSENTIAL + 40  # + the LoRA option rows (~7 s each) and diagnoses
RESERVE_TRAIN = 150  # full-FT naive + ours b32/48/64 (~55 s) + the LoRA section: what sampling's option rows leave
LORA_GRAD_SPLIT = 8  # the adapter-gradient row's split unless lora_small_gemms times another one faster
LORA_GRAD_SPLITS = (2, 4, 8, 16, 32)  # the splits lora_small_gemms times (N = batch x 284 rows: 4 divides any batch)
IMAGE_TOKEN = 32000
ACTION_IDS = torch.arange(31744, 32000)
N_ACT = 7
N_TEXT = 20  # text tokens after BOS + image: 1 + 256 + 20 + 7 = 284


# ----------------------------------------------------------------------------- model + data
def build_config(tiny: bool):
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    if tiny:
        vis = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=56, patch_size=14)
        txt = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=32064, max_position_embeddings=512)
    else:
        vis = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                 num_attention_heads=16, image_size=224, patch_size=14)
        txt = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    n_img = (vis.image_size // vis.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vis, text_config=txt, image_token_index=IMAGE_TOKEN,
                      vision_feature_select_strategy="full", vision_feature_layer=-2, image_seq_length=n_img,
                      projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return cfg, n_img


def built_on(device, dtype, make):
    """``make()``'s random model, built directly on ``device`` in ``dtype`` so the init runs there (seconds on a GPU)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(prev)


def build_model(cfg, device, dtype):
    from transformers import LlavaForConditionalGeneration

    model = built_on(device, dtype, lambda: LlavaForConditionalGeneration(cfg))
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop before 7 tokens
    model.generation_config.pad_token_id = 0
    model.config.use_cache = False
    return model


def make_batch(batch, n_img, image_size, device, dtype, with_actions, left_pad=0, seed=0):
    """[BOS, image x n_img, text x N_TEXT, (actions x 7)] left-padded by `left_pad` zeros."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 31000, (batch, N_TEXT), generator=g)
    parts = [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), IMAGE_TOKEN), text]
    if with_actions:
        parts.append(ACTION_IDS[torch.randint(0, 256, (batch, N_ACT), generator=g)])
    ids = torch.cat(parts, 1)
    mask = torch.ones_like(ids)
    if left_pad:
        ids = torch.cat([torch.zeros(batch, left_pad, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(batch, left_pad, dtype=torch.long), mask], 1)
    pix = torch.randn(batch, 3, image_size, image_size, generator=g).to(dtype)
    adv = torch.randn(batch, generator=g)
    return pix.to(device), ids.to(device), mask.to(device), adv.to(device)


# ----------------------------------------------------------------------------- naive baselines
def naive_generate(model, pix, ids, mask):
    out = model.generate(pixel_values=pix, input_ids=ids, attention_mask=mask, max_new_tokens=N_ACT,
                         do_sample=True, pad_token_id=0)
    return out[:, -N_ACT:]


def _up(x):  # float32, or float64 when the model runs in float64 (CPU reference)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def naive_log_probs(model, pix, ids, mask):
    """Full-vocab logits for every position, then OpenVLA's logits[:, -8:-1] restricted to actions."""
    logits = model(pixel_values=pix, input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B,T,V]
    act = _up(logits[:, -N_ACT - 1:-1])[..., ACTION_IDS.to(ids.device)]  # [B,7,256]
    idx = tokens_to_action_index(ids[:, -N_ACT:], ACTION_IDS)
    return torch.log_softmax(act, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def naive_incremental_log_probs(model, pix, ids, mask, toks):
    """Log-probs of given action tokens the way `generate` computes them: HF forward with its own
    DynamicCache, full-vocab head at each step, restricted to the action ids. ``toks: [B, 7]``."""
    cache_name = _cache_kwarg(model)
    pos = position_ids_from_mask(mask)
    out = model(pixel_values=pix, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    idx = tokens_to_action_index(toks, ACTION_IDS)
    lps = []
    for t in range(N_ACT):
        act = _up(out.logits[:, -1])[..., ACTION_IDS.to(ids.device)]  # [B, 256]
        lps.append(torch.log_softmax(act, -1).gather(-1, idx[:, t:t + 1]))
        if t == N_ACT - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=toks[:, t:t + 1], attention_mask=mask, position_ids=pos, use_cache=True,
                    **{cache_name: _cache_from(out)})
    return torch.cat(lps, 1)


def naive_step(model, opt, pix, ids, mask, adv):
    opt.zero_grad(set_to_none=True)
    loss, _ = reinforce_loss(naive_log_probs(model, pix, ids, mask), adv)
    loss.backward()
    opt.step()


# ----------------------------------------------------------------------------- harness
class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.t0 = time.time()
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self):
        return self.args.budget_s - (time.time() - self.t0)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_fn(self, fn, warmup, iters):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        self.sync()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t)
            if self.left() < 0:
                break
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")
        return statistics.median(ts), peak

    def measure(self, section, variant, batch, fn, flops_per_sample, need_s, warmup=1, iters=3, note=""):
        row = dict(section=section, variant=variant, batch=batch, note=note)
        if self.left() < need_s:
            row.update(status=f"skipped (time guard: {self.left():.0f}s left < {need_s}s)")
            print(f"[skip] {section} {variant} b{batch}: {row['status']}", flush=True)
        else:
            t_start = time.time()
            try:
                sec, peak = self.time_fn(fn, warmup, iters)
                sps = batch / sec
                row.update(status="ok", sec_per_iter=sec, samples_per_s=sps, peak_gib=peak,
                           mfu=sps * flops_per_sample / PEAK_FLOPS, wall_s=time.time() - t_start)
                print(f"[ok] {section:10s} {variant:28s} b{batch:<4d} {sps:8.2f}/s  MFU {row['mfu']:.3f} "
                      f"peak {peak:6.1f} GiB  ({row['wall_s']:.1f}s wall)", flush=True)
            except torch.OutOfMemoryError:
                row.update(status="OOM")
                print(f"[oom] {section} {variant} b{batch}", flush=True)
            except Exception as e:  # report and go on: one failure must not lose the run
                row.update(status=f"error: {type(e).__name__}: {str(e)[:200]}")
                print(f"[err] {section} {variant} b{batch}: {row['status']}", flush=True)
            finally:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.rows.append(row)
        self.write()
        return row

    def table(self):
        base = {}
        for r in self.rows:
            if r["variant"].startswith("naive") and r.get("status") == "ok":
                base[(r["section"], r["batch"])] = r["samples_per_s"]
        lines = ["| section | variant | batch | samples/s | × naive | MFU | peak GiB | status / note |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            if r.get("status") == "ok":
                b = base.get((r["section"], r["batch"]))
                ratio = f"{r['samples_per_s'] / b:.2f}" if b and not r["variant"].startswith("naive") else ""
                lines.append(f"| {r['section']} | {r['variant']} | {r['batch']} | {r['samples_per_s']:.2f} | {ratio} | "
                             f"{100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {r['note']} |")
            else:
                lines.append(f"| {r['section']} | {r['variant']} | {r['batch']} | | | | | {r['status']} {r['note']} |")
        return "\n".join(lines)

    def write(self):
        self.meta["elapsed_s"] = time.time() - self.t0
        (self.out / "results.json").write_text(json.dumps(dict(meta=self.meta, rows=self.rows), indent=1, default=str))
        head = " ".join(f"{k}={v}" for k, v in self.meta.items() if k != "checks")
        (self.out / "results.md").write_text(f"{head}\n\n{self.table()}\n\nchecks: {self.meta.get('checks')}\n")


# ----------------------------------------------------------------------------- correctness (tiny and GPU)
def _err(x, ref):
    d = (x.double() - ref.double()).abs()
    return dict(max=float(d.max()), mean=float(d.mean()))


def _no_farther(ours, naive, slack, eps):
    """Ours is no farther from the reference than naive, up to `slack` x naive + `eps` (mean and max)."""
    return all(ours[k] <= slack * naive[k] + eps for k in ("max", "mean"))


def _ref_copy(model, ref_dtype):
    """Higher-precision copy of the model for reference numerics (fp32 on the GPU, fp64 on the CPU)."""
    import copy

    ref = copy.deepcopy(model).to(ref_dtype)
    ref.eval()
    return ref


def check_against_reference(model, n_img, img, dtype, device, fused_ops):
    """Numerics against a higher-precision reference (fp32 on the GPU, fp64 for the CPU --tiny model).

    One prompt batch (rows 0,1 unpadded with filler tokens, rows 2,3 left padded by 3) and one draw of
    7 action tokens. Reference: the naive Hugging Face full-vocab forward on the same tokens, run on an
    fp32/fp64 copy of the model. Each working-precision path is compared to it:
      ours sampler (prefill + pre-allocated-cache decode), ours teacher-forced forward (padded, and
      rows 2,3 unpadded), naive HF full-vocab forward, naive HF incremental decode (DynamicCache,
      full-vocab head: what `generate` computes for these tokens).
    Pass: ours no farther from the reference than naive (<= 1.5 x naive + eps, for max and mean abs
    log-prob error; eps 0.01 nats in bf16, 1e-5 in fp32), and exact logic in the reference precision
    (ours == naive, padded == unpadded, to 1e-3 in fp32 / 1e-8 in fp64). Run for eager and fused ops.
    """
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    slack, eps = 1.5, (1e-5 if dtype == torch.float32 else 0.01)
    logic_tol = 1e-6 if ref_dtype == torch.float64 else 1e-3
    pix, ids, mask, _ = make_batch(4, n_img, img, device, dtype, with_actions=False, left_pad=0, seed=1)
    pad = 3
    ids_p = torch.cat([torch.zeros(4, pad, dtype=torch.long, device=device), ids], 1)
    mask_p = torch.cat([torch.zeros(4, pad, dtype=torch.long, device=device), mask], 1)
    mask_p[:2, :pad] = 1  # rows 0,1: pads count as real (filler) tokens
    ids_p[:2, :pad] = 5
    fused_ops(False)
    g = torch.Generator(device=device).manual_seed(0)
    toks, _ = sample_action_tokens(model, pix, ids_p, mask_p, ACTION_IDS, generator=g)
    in_set = bool(torch.isin(toks, ACTION_IDS.to(device)).all())
    full_ids, full_mask = torch.cat([ids_p, toks], 1), torch.cat([mask_p, torch.ones_like(toks)], 1)
    unpad_mask = torch.ones(2, ids.shape[1] + N_ACT, dtype=torch.long, device=device)

    # reference precision: naive (HF full vocab) is the reference; ours must agree with it exactly there
    ref = _ref_copy(model, ref_dtype)
    with torch.no_grad():
        pix_r = pix.to(ref_dtype)
        lp_ref = naive_log_probs(ref, pix_r, full_ids, full_mask)
        lp_ref_u = naive_log_probs(ref, pix_r[2:], torch.cat([ids[2:], toks[2:]], 1), unpad_mask)
        ours_ref, _ = action_token_log_probs(ref, pix_r, full_ids, full_mask, ACTION_IDS)
        _, samp_ref = sample_action_tokens(ref, pix_r, ids_p, mask_p, ACTION_IDS, tokens=toks)
    logic = dict(ours_vs_naive=_err(ours_ref, lp_ref)["max"], sampler_vs_naive=_err(samp_ref, lp_ref)["max"],
                 padded_vs_unpadded=_err(lp_ref[2:], lp_ref_u)["max"])
    del ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    with torch.no_grad():  # naive HF paths in working precision (independent of the fused-ops patch)
        naive_fwd = _err(naive_log_probs(model, pix, full_ids, full_mask), lp_ref)
        naive_inc = _err(naive_incremental_log_probs(model, pix, ids_p, mask_p, toks), lp_ref)
    res = dict(reference=str(ref_dtype), tokens_in_action_set=in_set, logic_in_ref_precision=logic,
               naive_full_vocab_forward=naive_fwd, naive_incremental_decode=naive_inc)
    ok = in_set and max(logic.values()) < logic_tol
    for name in ("eager", "fused_ops"):
        fused_ops(name == "fused_ops", min_rows=0)  # min_rows=0: the compiled kernels run even on this small batch
        try:
            with torch.no_grad():
                _, lp_s = sample_action_tokens(model, pix, ids_p, mask_p, ACTION_IDS, tokens=toks)
                lp_t, _ = action_token_log_probs(model, pix, full_ids, full_mask, ACTION_IDS)
                lp_u, _ = action_token_log_probs(model, pix[2:], torch.cat([ids[2:], toks[2:]], 1), unpad_mask,
                                                 ACTION_IDS)
                if name == "fused_ops":  # the benchmark switch of the residual-add row
                    with _options(model, {"residual adds in GEMM epilogue": True}):
                        _, lp_e = sample_action_tokens(model, pix, ids_p, mask_p, ACTION_IDS, tokens=toks)
            r = dict(sampler=_err(lp_s, lp_ref), teacher_forced=_err(lp_t, lp_ref),
                     teacher_forced_unpadded_rows23=_err(lp_u, lp_ref_u))
            if name == "fused_ops":  # its own verdict: a failure here only drops that row
                r["sampler_residual_adds_in_epilogue"] = _err(lp_e, lp_ref)
                r["residual_adds_in_epilogue_pass"] = bool(_no_farther(r["sampler_residual_adds_in_epilogue"],
                                                                       naive_inc, slack, eps))
            r["pass"] = bool(_no_farther(r["sampler"], naive_inc, slack, eps)
                             and _no_farther(r["teacher_forced"], naive_fwd, slack, eps)
                             and _no_farther(r["teacher_forced_unpadded_rows23"], naive_fwd, slack, eps))
        except Exception as e:  # report, keep measuring
            r = {"pass": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        res[name] = r
        ok = ok and r["pass"]
    fused_ops(False)
    res["rule"] = f"ours <= {slack} x naive + {eps} (max and mean |logp - ref|); logic < {logic_tol}"
    res["pass"] = bool(ok)
    return res


LORA_LINEARS = {"q/k/v/o": (4096, 4096, 4), "gate/up": (4096, 11008, 2), "down": (11008, 4096, 1)}  # in, out, per layer


def lora_small_gemms(device, dtype, rows: int, r: int = 32, linears: dict = LORA_LINEARS, layers: int = 32,
                     splits: tuple[int, ...] = LORA_GRAD_SPLITS, iters: int = 10) -> dict:
    """The rank-r products of one LoRA step, timed alone per linear shape: each moves a whole ``[rows, in]`` or
    ``[rows, out]`` activation for few FLOPs, so the measure is GB/s against the memory roofline (~4.8 TB/s on an
    H200). The weight-gradient products (``dyb^T x``, ``dy^T xa``) have a tiny ``[r, in]`` output and a long
    reduction: each of ``splits`` (k-way reduction, batched products + a float32 sum: ``fast_kernels._adapter_grad``
    itself) is timed beside cuBLAS's own choice (k = 1), and ``best_split`` is the k with the least step time.
    The frozen ``x W^T`` is timed too, plain and accumulating into its output (beta=1).
    Returns ms per op and shape, and the step's total (x linears per layer x layers) for each variant."""
    cuda = device.type == "cuda"

    def time_ms(fn) -> float:
        for _ in range(3):
            fn()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters

    g = torch.Generator(device=device).manual_seed(0)
    out: dict = {"rows": rows, "r": r}
    splits = (1,) + tuple(k for k in splits if k > 1 and rows % k == 0)
    totals: dict[str, float] = {}
    for name, (d_in, d_out, per_layer) in linears.items():
        def rand(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, generator=g)

        x, dy, y, dx = rand(rows, d_in), rand(rows, d_out), rand(rows, d_out), rand(rows, d_in)
        w = rand(d_out, d_in) / d_in ** 0.5
        a, b, xa, dyb = rand(r, d_in), rand(d_out, r), rand(rows, r), rand(rows, r)
        size = x.element_size()
        act_in, act_out = rows * d_in * size, rows * d_out * size
        ops = {  # name: (fn, bytes moved)
            "xa = x A^T": (lambda: x @ a.t(), act_in),
            "y += xa B^T (in place)": (lambda: y.addmm_(xa, b.t()), 2 * act_out),
            "xa B^T (rank-r first)": (lambda: xa @ b.t(), act_out),
            "dyb = dy B": (lambda: dy @ b, act_out),
            "dx += dyb A (in place)": (lambda: dx.addmm_(dyb, a), 2 * act_in),
            # the frozen product itself, plain and accumulating (beta=1: what rank-r-first and the residual
            # epilogue ask of it - does reading C cost a compute-bound GEMM anything?)
            "big: x W^T": (lambda: x @ w.t(), act_out),
            "big: y += x W^T (beta=1)": (lambda: y.addmm_(x, w.t()), 2 * act_out),
        }
        for k in splits:  # grad A = dyb^T x, grad B = dy^T xa, as the fused LoRA's backward computes them
            ops[f"grad A, split {k}"] = (functools.partial(_split_adapter_grad, k, dyb, x), act_in)
            ops[f"grad B, split {k}"] = (functools.partial(_split_adapter_grad, k, dy, xa), act_out)
        row = {"split_max_rel_err": max(  # the same gradients whatever the split (up to summation order)
            float((ops[f"grad {m}, split {k}"][0]() - ops[f"grad {m}, split 1"][0]()).abs().max()
                  / ops[f"grad {m}, split 1"][0]().abs().max()) for m in "AB" for k in splits)}
        for op, (fn, moved) in ops.items():
            ms = time_ms(fn)
            row[op] = dict(ms=round(ms, 4), gb_per_s=round(moved / ms / 1e6, 1))
            if op.startswith("big"):
                row[op]["tflop_per_s"] = round(2 * rows * d_in * d_out / ms / 1e9, 1)
            totals[op] = totals.get(op, 0.0) + ms * per_layer * layers
        out[f"{name} ({d_in}->{d_out})"] = row
        del x, dy, y, dx, w, a, b, xa, dyb
    default = ("xa = x A^T", "y += xa B^T (in place)", "dyb = dy B", "dx += dyb A (in place)", "grad A, split 1",
               "grad B, split 1")
    out["step_ms"] = {op: round(ms, 2) for op, ms in totals.items()}
    out["step_ms_default_total"] = round(sum(totals[op] for op in default), 2)
    grads_ms = {k: totals[f"grad A, split {k}"] + totals[f"grad B, split {k}"] for k in splits}
    out["best_split"] = min(grads_ms, key=grads_ms.get)
    return out


def _split_adapter_grad(k: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``fast_kernels._adapter_grad`` with its reduction split ``k`` ways."""
    previous, fk.LORA_GRAD_SPLIT = fk.LORA_GRAD_SPLIT, k
    try:
        return fk._adapter_grad(left, right)
    finally:
        fk.LORA_GRAD_SPLIT = previous


def check_lora_fused(model, n_img, img, dtype, device):
    """Fused LoRA and peft's own forward/backward, each against a higher-precision peft reference.

    The model is peft-wrapped; adapters get non-zero random A and B. Reference: peft's own forward on
    an fp32 (GPU) / fp64 (CPU) copy. Pass: fused no farther from it than peft in working precision
    (log-prob max abs error, and the global relative gradient error ||g - g_ref|| / ||g_ref||, each
    <= 1.5 x peft's + eps).
    """
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    slack, eps_lp, eps_g = 1.5, (1e-5 if dtype == torch.float32 else 0.01), (1e-5 if dtype == torch.float32 else 0.005)
    pix, ids, mask, adv = make_batch(2, n_img, img, device, dtype, with_actions=True, seed=2)
    fk.unfuse_lora_linears(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # non-zero B so the adapter path matters
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)

    def grads(m, px):
        ps = [p for p in m.parameters() if p.requires_grad]
        for p in ps:
            p.grad = None
        lp, _ = action_token_log_probs(m, px, ids, mask, ACTION_IDS)
        reinforce_loss(lp, adv)[0].backward()
        # adapters the loss never reaches (SigLIP's pooling head: Llava reads a hidden layer) have no gradient
        out = lp.detach(), [(torch.zeros_like(p) if p.grad is None else p.grad).detach().to(ref_dtype) for p in ps]
        for p in ps:
            p.grad = None
        return out

    ref = _ref_copy(model, ref_dtype)
    lp_ref, g_ref = grads(ref, pix.to(ref_dtype))
    del ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ref_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g_ref))

    def rel(gs):
        return math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(gs, g_ref))) / (ref_norm + 1e-30)

    lp_p, g_p = grads(model, pix)
    n = fk.fuse_lora_linears(model)
    lp_f, g_f = grads(model, pix)
    with _options(model, {"rank-r product first": True}):  # the other GEMM order (benchmarked as its own LoRA row)
        lp_l, g_l = grads(model, pix)
    res = dict(reference=str(ref_dtype), fused_modules=n,
               peft_logp_err=_err(lp_p, lp_ref), fused_logp_err=_err(lp_f, lp_ref),
               peft_grad_rel_err=rel(g_p), fused_grad_rel_err=rel(g_f),
               fused_vs_peft_logp_max=float((lp_f - lp_p).abs().max()),
               low_rank_first_logp_err=_err(lp_l, lp_ref), low_rank_first_grad_rel_err=rel(g_l))
    if device.type == "cuda":  # diagnosis (info only): the same fused path without bf16 reduced-precision
        # split-K reductions, suspected for the skinny x·Aᵀ GEMM (K = 4096 or 11008, N = r) - run 2's gap
        flags = torch.backends.cuda.matmul
        prev = flags.allow_bf16_reduced_precision_reduction
        flags.allow_bf16_reduced_precision_reduction = False
        try:
            lp_x, g_x = grads(model, pix)
        finally:
            flags.allow_bf16_reduced_precision_reduction = prev
        res["fused_no_reduced_precision_reduction"] = dict(logp_err=_err(lp_x, lp_ref), grad_rel_err=rel(g_x))
    res["pass"] = bool(n > 0 and all(
        _no_farther(res[f"{kind}_logp_err"], res["peft_logp_err"], slack, eps_lp)
        and res[f"{kind}_grad_rel_err"] <= slack * res["peft_grad_rel_err"] + eps_g
        for kind in ("fused", "low_rank_first")))
    res["rule"] = f"fused <= {slack} x peft + eps vs {ref_dtype} reference"
    return res


def check_graph_decode(model, n_img, img, dtype, device):
    """CUDA-graph decode vs eager decode, each against an fp32 (GPU) / fp64 (CPU) reference on the same
    unpadded prompts and forced tokens (with random weights the 256 logits nearly tie, so comparing
    free draws would compare different tokens). Pass: graph no farther from the reference than eager
    (<= 1.5 x + 0.01 nats, max and mean), and eager / graph each repeatable."""
    pix, ids, mask, _ = make_batch(4, n_img, img, device, dtype, with_actions=False, seed=5)
    with torch.no_grad():
        toks, lp_e = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, greedy=True)
        _, lp_e2 = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, tokens=toks)
        _, lp_g = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, tokens=toks, cuda_graphs=True)  # captures
        _, lp_g2 = sample_action_tokens(model, pix, ids, mask, ACTION_IDS, tokens=toks, cuda_graphs=True)  # replays
    clear_decode_graphs()
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    ref = _ref_copy(model, ref_dtype)
    with torch.no_grad():
        lp_ref = naive_log_probs(ref, pix.to(ref_dtype), torch.cat([ids, toks], 1), torch.cat([mask, torch.ones_like(toks)], 1))
    del ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    eager, graph, graph2 = _err(lp_e2, lp_ref), _err(lp_g, lp_ref), _err(lp_g2, lp_ref)
    return {"eager_vs_ref": eager, "graph_capture_call_vs_ref": graph, "graph_replay_call_vs_ref": graph2,
            "eager_repeat_max_diff": float((lp_e - lp_e2).abs().max()),
            "graph_repeat_max_diff": float((lp_g - lp_g2).abs().max()),
            "pass": bool(_no_farther(graph, eager, 1.5, 0.01) and _no_farther(graph2, eager, 1.5, 0.01))}


def _device_us(event, name: str) -> float:
    """A profiler event's device time (``name``, e.g. ``self_device_time_total``), under torch's older cuda name."""
    us = getattr(event, name, None)
    return us if us is not None else getattr(event, name.replace("device", "cuda"), 0.0)


def profile_breakdown(fn, device, top_n: int = 8) -> dict | None:
    """GPU kernel time of one call of ``fn`` by kind (GEMM, attention, compiled/triton, copies, other
    element-wise) and the idle share of its wall time (host-bound launch gaps)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kinds = {"gemm": 0.0, "attention": 0.0, "triton (compiled)": 0.0, "copy/cat": 0.0, "other": 0.0}
    top = []
    for ev in prof.key_averages():
        us = _device_us(ev, "self_device_time_total")
        if not us:
            continue
        name = ev.key.lower()
        if any(k in name for k in ("gemm", "cutlass", "xmma", "sm90", "cublas", "matmul", "splitk")):
            kind = "gemm"
        elif any(k in name for k in ("flash", "fmha", "attention", "cudnn", "sdpa")):
            kind = "attention"
        elif "triton" in name:
            kind = "triton (compiled)"
        elif any(k in name for k in ("copy", "memcpy", "cat", "memset")):
            kind = "copy/cat"
        else:
            kind = "other"
        kinds[kind] += us / 1e6
        top.append((us / 1e6, ev.key[:160]))
    busy = sum(kinds.values())
    top.sort(reverse=True)
    return dict(wall_s=round(wall, 4), kernel_s=round(busy, 4), idle_share=round(max(0.0, 1 - busy / wall), 3),
                by_kind_s={k: round(v, 4) for k, v in kinds.items()},
                top=[f"{sec * 1e3:.1f} ms {name}" for sec, name in top[:top_n]])


COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::cat", "aten::index",
            "aten::masked_scatter", "aten::pad", "aten::constant_pad_nd", "aten::transpose", "aten::reshape")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def _gemm_flops(key: str, shapes: list) -> float:
    """2 M K N (x batch) of one call, from the profiler's input shapes (mm: a, b; addmm: c, a, b)."""
    a, b = (shapes[0], shapes[1]) if key in ("aten::mm", "aten::bmm") else (shapes[1], shapes[2])
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def _caller(event, frames: int = 3) -> str:
    """Where a profiled op came from: the nearest Python frames above it outside torch (the profiler's parent events;
    its ``stack`` field stays empty without verbose mode), or, for an op of the backward pass, the autograd node."""
    found = []
    parent = event.cpu_parent
    while parent is not None and len(found) < frames:
        name = parent.name
        if name.startswith("autograd::engine::evaluate_function"):
            return name.split(": ", 1)[-1] + (" <- " + " <- ".join(found) if found else "")
        if "): " in name and not name.startswith(("torch/", "<built-in")) and "/torch/" not in name:
            found.append(name)
        parent = parent.cpu_parent
    return " <- ".join(found) or "?"


def copy_sources(fn, device, top_n: int = 10) -> dict | None:
    """Which CPU ops (with input shapes and the Python lines above them) launched the copy kernels of one call of
    ``fn``, and the GEMMs by shape with their TFLOP/s: runs 4-6 saw ~80 ms of strided ``direct_copy_kernel`` per
    b256 sampling call and a 42 ms memcpy per LoRA step that the kernel-level profile could not attribute, and
    LoRA's GEMMs averaged ~590 TFLOP/s against ~700 in sampling (its rank-r products are memory-bound). Device
    time includes the op's child ops (on a CPU: CPU time, for tests)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def op_us(ev) -> float:
        return _device_us(ev, "device_time_total") if cuda else ev.cpu_time_total

    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    by_source: dict[tuple, list] = {}  # (op, shapes, where) -> [us, count]
    for ev in prof.events():
        if ev.name not in COPY_OPS:
            continue
        us = op_us(ev)
        if us > 0:
            entry = by_source.setdefault((ev.name, str(ev.input_shapes)[:140], _caller(ev)), [0.0, 0])
            entry[0] += us
            entry[1] += 1
    copies = [(us, f"{us / 1e3:.1f} ms x{count} {op} {shapes} <- {where}")
              for (op, shapes, where), (us, count) in by_source.items()]
    gemms = []
    for ev in prof.key_averages(group_by_input_shape=True):
        us = op_us(ev)
        if ev.key not in GEMM_OPS or us <= 0:
            continue
        try:
            flops = _gemm_flops(ev.key, ev.input_shapes) * ev.count
        except (IndexError, TypeError):
            flops = 0.0
        gemms.append((us, f"{us / 1e3:.1f} ms x{ev.count} {ev.key} {ev.input_shapes} {flops / us / 1e6:.0f} TFLOP/s"))
    copies.sort(reverse=True)
    gemms.sort(reverse=True)
    return dict(copies=[text for _, text in copies[:top_n]], gemms=[text for _, text in gemms[:2 * top_n]],
                gemm_ms=round(sum(us for us, _ in gemms) / 1e3, 1))


def _faster(row: dict, than: dict) -> bool:
    """Whether ``row`` measured more samples/s than ``than`` (both measured in this run)."""
    return row.get("status") == "ok" and than.get("status") == "ok" and row["samples_per_s"] > than["samples_per_s"]


def _option_row(bench, chosen: dict[str, bool], name: str, model, base_row: dict, section: str, variant: str,
                batch: int, fn, flops: float, need_s: float, note: str) -> None:
    """Measure one optional speed-up (a name :func:`_options` knows) on its own, and record in ``chosen[name]``
    whether it beat ``base_row``."""
    with _options(model, {name: True}):
        row = bench.measure(section, variant, batch, fn, flops, need_s=need_s, warmup=2, iters=3, note=note)
    chosen[name] = _faster(row, base_row)


@contextmanager
def _options(model, options: dict[str, bool]):
    """Inside, the optional speed-ups that measured faster at the smaller batch (``options[name]`` True) are on;
    the largest-batch rows (sampling b512, LoRA b80: the best figures) run with them."""
    on = {name for name, faster in options.items() if faster}
    if "compiled KV write" in on:
        openvla_fast.KV_WRITE = "compiled"
    if "residual adds in GEMM epilogue" in on:
        openvla_fast.RESIDUAL_EPILOGUE = True
    if "flash attention first" in on:
        openvla_fast.ATTENTION_FIRST = "flash"
    if "rank-r product first" in on:
        fk.LORA_LOW_RANK_FIRST = True
    if "adapter gradients split" in on:
        fk.LORA_GRAD_SPLIT = LORA_GRAD_SPLIT
    if "SigLIP layers compiled" in on:
        fk.compile_decoder_layers(model, True, dynamic=False, suffixes=("EncoderLayer",))
    try:
        with _blas_library("cublaslt" if "cuBLASLt GEMMs" in on else None):
            yield
    finally:
        openvla_fast.KV_WRITE = "eager"
        openvla_fast.RESIDUAL_EPILOGUE = False
        openvla_fast.ATTENTION_FIRST = None
        fk.LORA_LOW_RANK_FIRST = False
        fk.LORA_GRAD_SPLIT = 1
        if "SigLIP layers compiled" in on:
            fk.compile_decoder_layers(model, False, suffixes=("EncoderLayer",))


def _use_grad_split(k: int) -> None:
    """The split the "adapter gradients split" option runs with from now on."""
    global LORA_GRAD_SPLIT
    LORA_GRAD_SPLIT = k


def _recompiled(model, dynamic: bool, **kwargs) -> None:
    """Forget every compiled graph (``torch._dynamo.reset``) and compile the decoder layers again with ``dynamic``
    fixed: False = a graph per batch size (static sizes in every kernel), True = one shape-generic graph. The default
    (None) gives the first batch size a static graph and every later size the generic one (automatic dynamic
    shapes): what runs 4-6's second and third training batch sizes ran; run 5 measured a shape-generic rotary kernel
    at 270 GB/s (14x slower than its per-shape compile)."""
    torch._dynamo.reset()
    fk.compile_decoder_layers(model, True, dynamic=dynamic, **kwargs)


@contextmanager
def _blas_library(name: str | None):
    """Inside, torch's CUDA GEMMs prefer ``name`` ("cublaslt": cuBLASLt's own kernel heuristics instead of
    cuBLAS's, for every product; the GEMMs are ~80 % of every step); None, or no CUDA: unchanged."""
    previous = None
    if name is not None and torch.cuda.is_available():
        try:
            previous = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library(name)
        except Exception as e:  # e.g. a build without cuBLASLt: the row then measures the default library
            print(f"[warn] preferred_blas_library({name!r}): {type(e).__name__}: {e}", flush=True)
            previous = None
    try:
        yield
    finally:
        if previous is not None:
            torch.backends.cuda.preferred_blas_library(previous)


def _options_note(options: dict[str, bool]) -> str:
    on = [name for name, faster in options.items() if faster]
    return ", + " + " + ".join(on) + " (faster at the smaller batch)" if on else ""


def _record(bench, key, diagnose, device, fn) -> None:
    """``bench.meta[key] = diagnose(fn, device)``; a diagnosis never stops the measurements."""
    try:
        bench.meta[key] = diagnose(fn, device)
    except Exception as e:
        bench.meta[key] = f"error: {type(e).__name__}: {str(e)[:200]}"
    print(key, json.dumps(bench.meta[key], indent=1), flush=True)


def _record_copy_sources(bench, key, device, fn) -> None:
    _record(bench, key, copy_sources, device, fn)


def _record_profile(bench, key, device, fn) -> None:
    _record(bench, key, profile_breakdown, device, fn)


def sampling_variants(bench, model, batch_of, fused_ops, fwd, action_ids, device, tiny) -> int:
    """Runs 5-6: where the b256 sampling time goes. Run 5: the shape-generic compiled rotary kernel took
    270 ms of 2.0 s (per-shape compile: 19 ms); run 6: the KV cache's memory layout (head-major made the
    prefill's cache write a strided transpose). Each row: the CUDA-graph sampler, beside naive."""

    b_main = 4 if tiny else 256
    rows = [(b_main, "naive", None, None), (b_main, "head", True, "fused ops, shape-generic compile, head-major KV (run 5)"),
            (b_main, "head", False, "fused ops, per-shape compile, head-major KV (run 5)"),
            (b_main, "token", False, "fused ops, per-shape compile, token-major KV")]
    if not tiny:
        rows += [(128, "naive", None, None), (128, "token", False, "fused ops, per-shape compile, token-major KV"),
                 (512, "token", False, "fused ops, per-shape compile, token-major KV")]
    current = None
    for b, layout, dynamic, name in rows:
        if b != current:
            clear_decode_graphs()
            pix, ids, mask, _ = batch_of(b, False)
            current = b
        if layout == "naive":
            bench.measure("sample", "naive generate", b, lambda: naive_generate(model, pix, ids, mask), fwd,
                          need_s=10, warmup=1, iters=3)
            continue
        openvla_fast.KV_LAYOUT = layout
        clear_decode_graphs()
        fused_ops(True, dynamic=dynamic)
        bench.measure("sample", f"ours + CUDA graphs, {name}", b,
                      lambda: sample_action_tokens(model, pix, ids, mask, action_ids, cuda_graphs=True), fwd,
                      need_s=15 + b * 0.04, warmup=2, iters=3, note="")
        if b == b_main:
            _record(bench, f"profile {name}", lambda fn, dev: profile_breakdown(fn, dev, top_n=16), device,
                    lambda: sample_action_tokens(model, pix, ids, mask, action_ids, cuda_graphs=True))
            if layout == "token":
                _record_copy_sources(bench, f"copy sources {name}", device, lambda: sample_action_tokens(
                    model, pix, ids, mask, action_ids, cuda_graphs=True))
        fused_ops(False)
    openvla_fast.KV_LAYOUT = "token"
    clear_decode_graphs()
    bench.write()
    print("\n" + bench.table(), flush=True)
    return 0


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU, correctness checks, seconds")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements near this")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--no-extras", action="store_true", help="skip the regional torch.compile variants")
    ap.add_argument("--tiny-compile", action="store_true", help="with --tiny: really torch.compile (minutes on CPU)")
    ap.add_argument("--graph-check", action="store_true", help="only the CUDA-graph decode numerics check")
    ap.add_argument("--grad-split", type=int, default=0,
                    help="the LoRA adapter-gradient split row's k (0: the split lora_small_gemms times fastest)")
    ap.add_argument("--sampling-variants", action="store_true",
                    help="only sampling at b128/b256: naive vs fused-op variants (rotary patched or not, "
                         "shape-generic or per-shape compile), each with CUDA-graph decode, plus kernel profiles")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tiny = args.tiny or device.type == "cpu"
    use_compile = not tiny or args.tiny_compile
    if not use_compile:
        args.no_extras = True

    vision_hooks: list = []

    def contiguous_vision(on: bool):
        """Ours: SigLIP's patch embeddings made contiguous (fast_kernels.contiguous_output); naive rows run without."""
        while vision_hooks:
            vision_hooks.pop().remove()
        if on:
            vision_hooks.extend(fk.contiguous_patch_embeddings(model))

    def fused_ops(on: bool, min_rows: int | None = None, dynamic: bool = False):
        """Fused element-wise ops: compiled for inputs of >= min_rows rows (default 2048; 0 with --tiny); and
        contiguous vision embeddings."""
        fk.enable_fused_llama_ops(on, compile=use_compile, min_rows=(0 if tiny else 2048) if min_rows is None else min_rows,
                                  dynamic=dynamic)
        contiguous_vision(on)
    bench = Bench(args, device)
    import transformers

    bench.meta.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      torch=torch.__version__, transformers=transformers.__version__, dtype=str(dtype), tiny=tiny)
    try:
        import peft

        bench.meta["peft"] = peft.__version__
    except ImportError:
        bench.meta["peft"] = None
    print(bench.meta, flush=True)

    cfg, n_img = build_config(tiny)
    img = cfg.vision_config.image_size
    t = time.time()
    model = build_model(cfg, device, dtype)
    model.eval()  # no dropout anywhere; gradients still flow
    n_params = sum(p.numel() for p in model.parameters())
    seq = 1 + n_img + N_TEXT + N_ACT
    bench.meta.update(params=n_params, seq=seq, build_s=round(time.time() - t, 1))
    print(f"model built in {time.time() - t:.1f}s: {n_params / 1e9:.3f}B params, {seq} tokens/sample", flush=True)
    fwd, full, lora = (c * n_params * seq for c in (2, 6, 4))
    sizes = dict(sample=[1, 64, 128, 256], full=[32, 48, 64], lora=[32, 64]) if not tiny else \
        dict(sample=[1, 4], full=[2, 3], lora=[2, 3])
    ACTION_IDS_DEV = ACTION_IDS.to(device)

    if args.sampling_variants or args.graph_check:
        def batch_of(b, actions):
            return make_batch(b, n_img, img, device, dtype, with_actions=actions, seed=b)
        if device.type == "cuda" or args.graph_check:
            bench.meta["checks"] = {"cuda_graph_decode": check_graph_decode(model, n_img, img, dtype, device)}
            print("graph check:", json.dumps(bench.meta["checks"]), flush=True)
            bench.write()
        if args.graph_check:
            return 0
        return sampling_variants(bench, model, batch_of, fused_ops, fwd, ACTION_IDS_DEV, device, tiny)

    # correctness first (cheap): ours and naive against an fp32 (GPU) / fp64 (CPU) reference
    try:
        checks = {"numerics": check_against_reference(model, n_img, img, dtype, device, fused_ops)}
    except Exception as e:  # report, keep measuring
        checks = {"numerics": {"pass": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}}
    fused = checks["numerics"].get("fused_ops", {})
    if use_compile and (not fused or "error" in fused):  # compiled ops broke: measure the eager formulas instead
        use_compile = False
        args.no_extras = True
        bench.meta["compile_fallback"] = fused.get("error", checks["numerics"].get("error"))
    bench.meta["torch_compile"] = use_compile
    bench.meta["checks"] = checks
    if device.type == "cuda":
        try:
            checks["cuda_graph_decode"] = check_graph_decode(model, n_img, img, dtype, device)
        except Exception as e:
            checks["cuda_graph_decode"] = {"pass": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    print("checks:", json.dumps(checks), flush=True)

    def batch_of(b, actions):
        return make_batch(b, n_img, img, device, dtype, with_actions=actions, seed=b)

    # (a) sampling ------------------------------------------------------------------------------------------
    for b in sizes["sample"]:
        pix, ids, mask, _ = batch_of(b, False)
        bench.measure("sample", "naive generate", b, lambda: naive_generate(model, pix, ids, mask), fwd,
                      need_s=10 + b * 0.05, warmup=1, iters=3)
        del pix, ids, mask
    fused_ops(True)  # compiled element-wise ops for inputs >= 2048 rows (prefill at b>=8), eager below
    sample_options: dict[str, bool] = {}  # optional speed-ups measured at the largest batch: True = it was faster
    note = "action head, in-place KV cache, last layer trimmed, fused ops >= 2048 rows"
    for b in sizes["sample"]:
        pix, ids, mask, _ = batch_of(b, False)
        if b in (sizes["sample"][0], sizes["sample"][-1]):  # the product's default (graphs are opt-in); run 4 has all
            bench.measure("sample", "ours (eager decode)", b,
                          lambda: sample_action_tokens(model, pix, ids, mask, ACTION_IDS_DEV), fwd,
                          need_s=10 + b * 0.05, warmup=2, iters=3, note=note + ", eager decode")
        graphs_row = bench.measure("sample", "ours + CUDA-graph decode", b,
                                   lambda: sample_action_tokens(model, pix, ids, mask, ACTION_IDS_DEV, cuda_graphs=True),
                                   fwd, need_s=10 + b * 0.05, warmup=2, iters=3,
                                   note=note + ", decode steps replayed as CUDA graphs")
        def sample_option(name, variant, note):
            _option_row(bench, sample_options, name, model, graphs_row, "sample", variant, b,
                        lambda: sample_action_tokens(model, pix, ids, mask, ACTION_IDS_DEV, cuda_graphs=True), fwd,
                        need_s=20 + b * 0.05 + RESERVE_TRAIN, note=note)

        if b == sizes["sample"][-1] and checks["numerics"].get("fused_ops", {}).get("residual_adds_in_epilogue_pass"):
            sample_option("residual adds in GEMM epilogue", "ours + CUDA graphs + residual adds in GEMM epilogue",
                          "openvla_fast.RESIDUAL_EPILOGUE: prefill o_proj / down_proj addmm_ into the stream")
        if b == sizes["sample"][-1] and device.type == "cuda":
            clear_decode_graphs()  # the decode graphs are captured with the library preferred at capture
            sample_option("cuBLASLt GEMMs", "ours + CUDA graphs + cuBLASLt GEMMs",
                          "torch.backends.cuda.preferred_blas_library('cublaslt')")
            clear_decode_graphs()
        if b == sizes["sample"][-1]:  # graphs are cleared as for cuBLASLt: they keep the kernels of their capture
            sample_option("flash attention first", "ours + CUDA graphs + flash attention first",
                          "openvla_fast.ATTENTION_FIRST: SDPA tries FlashAttention-2 before cuDNN")
            clear_decode_graphs()
        if b == sizes["sample"][-1] and use_compile and not args.no_extras:
            sample_option("compiled KV write", "ours + CUDA graphs + compiled KV write",
                          "openvla_fast.KV_WRITE: the cache slice write vectorized by inductor")
            sample_option("SigLIP layers compiled", "ours + CUDA graphs + SigLIP layers compiled",
                          "vision encoder layers regionally compiled (fixed shapes)")
        if b == sizes["sample"][-1]:
            _record_profile(bench, "profile_sample_b%d" % b, device, lambda: sample_action_tokens(
                model, pix, ids, mask, ACTION_IDS_DEV, cuda_graphs=True))
            _record_copy_sources(bench, "copy sources sample b%d" % b, device, lambda: sample_action_tokens(
                model, pix, ids, mask, ACTION_IDS_DEV, cuda_graphs=True))
        clear_decode_graphs()
        del pix, ids, mask
    b = 512 if not tiny else 2 * sizes["sample"][-1]
    pix, ids, mask, _ = batch_of(b, False)
    clear_decode_graphs()
    with _options(model, sample_options):
        bench.measure("sample", "ours + CUDA-graph decode", b,
                      lambda: sample_action_tokens(model, pix, ids, mask, ACTION_IDS_DEV, cuda_graphs=True), fwd,
                      need_s=40 + RESERVE_TRAIN, warmup=1, iters=3,
                      note=note + ", decode steps replayed as CUDA graphs" + _options_note(sample_options))
    clear_decode_graphs()
    del pix, ids, mask
    fused_ops(False)

    # (c) full fine-tune REINFORCE update ------------------------------------------------------------------
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()  # configs have zero dropout; train() only matters for checkpointing flags
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)  # naive: default (foreach) AdamW
    b = sizes["full"][0]
    pix, ids, mask, adv = batch_of(b, True)
    bench.measure("full-FT", "naive (full vocab, AdamW)", b, lambda: naive_step(model, opt, pix, ids, mask, adv),
                  full, need_s=15 + b * 0.2, note="no grad checkpointing")
    del pix, ids, mask, adv, opt
    model.zero_grad(set_to_none=True)
    gc.collect()
    opt = make_adamw(model.parameters(), lr=1e-7)
    if use_compile:  # inductor fuses the element-wise ops inside the compiled layers itself (as in run 1); the last
        # layer stays eager so its o_proj / MLP run on the 8 positions the head reads (as LoRA and the product path)
        fk.compile_decoder_layers(model, True, last_eager=True)
    fused_ops(True)  # the eager last layer's norm / rotary / SwiGLU, as the product path (apply_speedups) has them
    full_options: dict[str, bool] = {}  # optional speed-ups measured at the largest batch: True = it was faster
    bench.meta["full-FT options faster"] = full_options
    for b in sizes["full"]:
        pix, ids, mask, adv = batch_of(b, True)
        rb = ReinforceBatch(pix, ids, mask, adv)
        ours_row = bench.measure("full-FT", "ours + compiled decoder layers", b,
                                 lambda: reinforce_step(model, opt, rb, ACTION_IDS_DEV), full,
                                 need_s=15 + b * 0.1 + LORA_ESSENTIAL, warmup=2,
                                 note="action head, regional torch.compile fwd+bwd, last layer trimmed, fused AdamW, no ckpt")
        if b == sizes["full"][-1]:  # never profiled before: where the ~0.3 s beside the GEMMs goes
            _record_profile(bench, "profile_full_b%d" % b, device, lambda: reinforce_step(model, opt, rb, ACTION_IDS_DEV))

            def full_option(name, variant, need_s, note):
                _option_row(bench, full_options, name, model, ours_row, "full-FT", variant, b,
                            lambda: reinforce_step(model, opt, rb, ACTION_IDS_DEV), full, need_s=need_s + RESERVE_LORA,
                            note=note)

            if device.type == "cuda":
                full_option("cuBLASLt GEMMs", "ours + cuBLASLt GEMMs", 20,
                            "torch.backends.cuda.preferred_blas_library('cublaslt')")
            if use_compile and not args.no_extras:  # run 3: +1.3 % at b48, run 4: +0.1 %; the vision tower trains too
                full_option("SigLIP layers compiled", "ours + SigLIP layers compiled", 25,
                            "vision encoder layers regionally compiled (fixed shapes), forward and backward")
        del pix, ids, mask, adv, rb
    if use_compile and not args.no_extras:  # b48 / b64 above ran the shape-generic graph a second batch size gets
        b = sizes["full"][-1]
        pix, ids, mask, adv = batch_of(b, True)
        rb = ReinforceBatch(pix, ids, mask, adv)
        _recompiled(model, dynamic=False, last_eager=True)
        bench.measure("full-FT", "ours, static-shape compile", b,
                      lambda: reinforce_step(model, opt, rb, ACTION_IDS_DEV), full, need_s=30 + RESERVE_LORA,
                      warmup=2, note="decoder layers compiled for this batch size alone (dynamic=False)")
        del pix, ids, mask, adv, rb
    fk.compile_decoder_layers(model, False)
    fused_ops(False)
    del opt
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # (d) LoRA ---------------------------------------------------------------------------------------------
    if bench.meta["peft"] is None:
        bench.rows.append(dict(section="LoRA", variant="all", batch=0, note="", status="skipped: peft not installed"))
    else:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear")  # all but lm_head
        pmodel = get_peft_model(model, lcfg)
        n_lora = sum(p.numel() for p in pmodel.parameters() if p.requires_grad)
        bench.meta["lora_params"] = n_lora
        try:
            bench.meta["checks"]["fused_lora"] = check_lora_fused(pmodel, n_img, img, dtype, device)
        except Exception as e:
            bench.meta["checks"]["fused_lora"] = {"pass": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("fused LoRA check:", json.dumps(bench.meta["checks"]["fused_lora"]), flush=True)
        fk.unfuse_lora_linears(pmodel)
        pmodel.train()
        opt = torch.optim.AdamW([p for p in pmodel.parameters() if p.requires_grad], lr=1e-5)
        b = sizes["lora"][0]
        pix, ids, mask, adv = batch_of(b, True)
        bench.measure("LoRA", "naive peft (full vocab, AdamW)", b,
                      lambda: naive_step(pmodel, opt, pix, ids, mask, adv), lora, need_s=15 + b * 0.2,
                      note=f"r=32 all linear layers (vision, projector, LM), adapters fp32 (peft default), "
                           f"{n_lora / 1e6:.0f}M params")
        del pix, ids, mask, adv, opt
        pmodel.zero_grad(set_to_none=True)
        n_fused = fk.fuse_lora_linears(pmodel)
        lora_options: dict[str, bool] = {}  # optional speed-ups measured at b64: True = it was faster
        opt = make_adamw(pmodel.parameters(), lr=1e-5)
        if use_compile:  # the last layer stays eager: its o_proj / MLP run on the 8 positions the head reads
            fk.compile_decoder_layers(pmodel, True, last_eager=True)
        fused_ops(True)  # the eager last layer's element-wise ops, as in the product path
        for b in sizes["lora"]:
            pix, ids, mask, adv = batch_of(b, True)
            rb = ReinforceBatch(pix, ids, mask, adv)
            base_row = bench.measure("LoRA", "ours + compiled decoder layers", b,
                                     lambda: reinforce_step(pmodel, opt, rb, ACTION_IDS_DEV), lora, need_s=15 + b * 0.2 + RESERVE_LORA_LARGEST,
                                     warmup=2, note=f"{n_fused} fused LoRA linears (bf16 math, fp32 master), compiled "
                                                    "layers, last layer trimmed, fused AdamW")
            if b == sizes["lora"][-1]:
                _record_profile(bench, "profile_lora_b%d" % b, device,
                                lambda: reinforce_step(pmodel, opt, rb, ACTION_IDS_DEV))
                _record_copy_sources(bench, "copy sources LoRA b%d" % b, device,
                                     lambda: reinforce_step(pmodel, opt, rb, ACTION_IDS_DEV))
                small = dict(linears=LORA_LINEARS, layers=32) if not tiny else dict(
                    linears={"q/k/v/o": (64, 64, 4), "gate/up": (64, 128, 2), "down": (128, 64, 1)}, layers=2, r=4)
                key = "LoRA rank-r products b%d" % b
                _record(bench, key, lambda fn, dev: lora_small_gemms(dev, dtype, rows=b * seq, **small), device, None)
                timed = bench.meta.get(key)
                _use_grad_split(args.grad_split or (timed["best_split"] if isinstance(timed, dict) else LORA_GRAD_SPLIT))
                def lora_option(name, variant, note):
                    _option_row(bench, lora_options, name, pmodel, base_row, "LoRA", variant, b,
                                lambda: reinforce_step(pmodel, opt, rb, ACTION_IDS_DEV), lora,
                                need_s=12 + RESERVE_LORA_LARGEST, note=note)

                lora_option("rank-r product first", "ours, rank-r product first (GEMM epilogue adds it)",
                            "fast_kernels.LORA_LOW_RANK_FIRST: one pass over each output less")
                if LORA_GRAD_SPLIT > 1:  # 1: cuBLAS's own reduction timed fastest alone
                    lora_option("adapter gradients split", f"ours, adapter gradients split {LORA_GRAD_SPLIT} ways",
                                "fast_kernels.LORA_GRAD_SPLIT: batched partial products + a float32 sum (the split "
                                "lora_small_gemms timed fastest)")
                if device.type == "cuda":
                    lora_option("cuBLASLt GEMMs", "ours + cuBLASLt GEMMs",
                                "torch.backends.cuda.preferred_blas_library('cublaslt')")
                if use_compile and not args.no_extras:  # the adapted vision tower now runs a backward too
                    lora_option("SigLIP layers compiled", "ours + SigLIP layers compiled",
                                "vision encoder layers regionally compiled (fixed shapes), forward and backward")
                if use_compile and not args.no_extras:  # b64 above ran the shape-generic graph (second size)
                    _recompiled(pmodel, dynamic=False, last_eager=True)
                    row = bench.measure("LoRA", "ours, static-shape compile", b,
                                        lambda: reinforce_step(pmodel, opt, rb, ACTION_IDS_DEV), lora,
                                        need_s=25 + RESERVE_LORA_LARGEST, warmup=2,
                                        note="decoder layers compiled for this batch size alone (dynamic=False)")
                    lora_options["static-shape compile"] = _faster(row, base_row)
                    if not lora_options["static-shape compile"]:  # b80: the shape-generic graph again
                        _recompiled(pmodel, dynamic=True, last_eager=True)
            del pix, ids, mask, adv, rb
        for b in (LORA_LARGEST, LORA_LARGEST - 8) if not tiny else (sizes["lora"][-1] + 1,):  # smaller if OOM
            pix, ids, mask, adv = batch_of(b, True)
            rb = ReinforceBatch(pix, ids, mask, adv)
            with _options(pmodel, lora_options):
                row = bench.measure("LoRA", "ours + compiled decoder layers", b,
                                    lambda: reinforce_step(pmodel, opt, rb, ACTION_IDS_DEV), lora,
                                    need_s=RESERVE_LORA_LARGEST, warmup=2, note="as above" + _options_note(lora_options))
            del pix, ids, mask, adv, rb
            if row["status"] != "OOM":
                break
        fk.compile_decoder_layers(pmodel, False)
        fused_ops(False)

    bench.meta["elapsed_s"] = time.time() - bench.t0
    bench.write()
    print("\n" + bench.table(), flush=True)
    print("\nchecks:", json.dumps(bench.meta["checks"]), flush=True)
    ok = all(v.get("pass", False) for v in bench.meta["checks"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Opt-in speed-ups for Llama-based VLA policies: fused element-wise ops, fused LoRA, regional compile.

Why: at OpenVLA's shapes (B x 284 tokens, d = 4096) the matrix products run near the chip's peak,
and the time lost is in Hugging Face's eager element-wise code between them - RMSNorm is seven
kernels with float32 intermediates, rotary embedding five, SwiGLU two, and peft's LoRA adds a
scale and an add pass over every projection output (in float32 when adapters are autocast). Each
helper below keeps the module tree, parameter names and numerics (same formulas, fewer passes), so
checkpoints and peft adapters are unaffected; each is reversible.

* :func:`enable_fused_llama_ops` - RMSNorm, rotary and SwiGLU as ``torch.compile``-d functions
  (one fused kernel each, forward and backward; dynamic shapes so one compile serves all batches).
* :func:`fuse_lora_linears` - peft ``lora.Linear`` forward as one autograd Function:
  ``y = x W^T + s (x A^T) B^T`` with the LoRA product accumulated into ``x W^T`` in place (GEMM
  epilogue, no extra pass), adapter math in the activation dtype, grads cast to the master dtype.
* :func:`compile_decoder_layers` - regional ``torch.compile`` of each decoder layer (use for
  cache-free forwards: teacher forcing and training).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

__all__ = ["compile_decoder_layers", "contiguous_output", "contiguous_patch_embeddings", "decoder_layers",
           "enable_fused_llama_ops", "fuse_lora_linears", "residual_adds_in_epilogue", "uncompiled",
           "unfuse_lora_linears"]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, HF's exact formula: float32 statistics, cast back, then scale. ``x: [..., d]``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: ``silu(gate) * up``, both ``[..., intermediate]``."""
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF ``apply_rotary_pos_emb``: ``q, k: [B, H, T, D]``, ``cos, sin: [B, T, D]``."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


_COMPILED: dict[str, object] = {}
_ORIGINALS: dict[str, object] = {}


def _compiled(name: str, fn, compile: bool, dynamic: bool = True):
    if not compile:  # same formulas, eager: for CPU tests and for debugging
        return fn
    key = f"{name}/{'dynamic' if dynamic else 'static'}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[key]


def _raise_recompile_limit(limit: int = 64) -> None:
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), limit))


def enable_fused_llama_ops(enable: bool = True, compile: bool = True, min_rows: int = 2048,
                           dynamic: bool = False) -> None:
    """Patch (``enable=True``) or restore HF Llama's RMSNorm, MLP and rotary with fused versions.

    ``compile=False`` installs the same formulas uncompiled (tests the patch without compile time).
    ``min_rows``: inputs with fewer rows (tokens, ``numel / last dim``) than this run the same
    formulas eagerly. Each call into a compiled function costs guard evaluation on the host (about
    0.1 ms each, ~130 calls per forward); for small inputs - decode steps, batch-1 prefill - that
    host time exceeds the GPU time saved (run 1: batch-1 sampling 0.57x naive with every call compiled).
    Affects every Llama model in the process (class-level patch). The MLP patch assumes
    ``hidden_act == "silu"`` and falls back to the original forward otherwise.
    ``dynamic=False`` (default) compiles once per input shape; the shape-generic kernels of
    ``dynamic=True`` were much slower for the rotary embedding (run 5, H200, b256 prefill: 270 ms vs 19 ms).
    """
    from transformers.models.llama import modeling_llama as ml

    if not _ORIGINALS:
        _ORIGINALS.update(
            norm=ml.LlamaRMSNorm.forward, mlp=ml.LlamaMLP.forward, rope=ml.apply_rotary_pos_emb
        )
    if not enable:
        ml.LlamaRMSNorm.forward = _ORIGINALS["norm"]
        ml.LlamaMLP.forward = _ORIGINALS["mlp"]
        ml.apply_rotary_pos_emb = _ORIGINALS["rope"]
        return
    _raise_recompile_limit()
    norm_c = _compiled("norm", _rms_norm, compile, dynamic)
    silu_mul_c = _compiled("silu_mul", _silu_mul, compile, dynamic)
    rope_c = _compiled("rope", _apply_rotary, compile, dynamic)
    orig_mlp = _ORIGINALS["mlp"]

    def big(rows: int) -> bool:
        # inside a compiled region (compile_decoder_layers) inductor fuses the plain formulas itself
        return rows >= min_rows and not torch.compiler.is_compiling()

    def norm_forward(self, hidden_states):
        fn = norm_c if big(hidden_states.numel() // hidden_states.shape[-1]) else _rms_norm
        return fn(hidden_states, self.weight, self.variance_epsilon)

    def mlp_forward(self, x):
        if getattr(self.config, "hidden_act", "silu") != "silu":
            return orig_mlp(self, x)
        fn = silu_mul_c if big(x.numel() // x.shape[-1]) else _silu_mul
        return self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))

    def rope(q, k, cos, sin, *args, **kwargs):  # q: [B, H, T, D]
        fn = rope_c if big(q.numel() // (q.shape[1] * q.shape[-1])) else _apply_rotary  # rows: tokens
        return fn(q, k, cos, sin, *args, **kwargs)

    ml.LlamaRMSNorm.forward = norm_forward
    ml.LlamaMLP.forward = mlp_forward
    ml.apply_rotary_pos_emb = rope


LORA_LOW_RANK_FIRST = False  # benchmark switch, see _plus_low_rank; off until measured on a GPU
LORA_GRAD_SPLIT = 1  # benchmark switch, see _adapter_grad: k > 1 splits the adapters' gradient reductions k ways


def _opaque_when_compiled(name: str, fake):
    """Decorator: ``fn`` runs as itself in eager code and as the opaque custom op ``vla_razor::<name>`` inside
    ``torch.compile``: inductor then neither functionalises its in-place steps (an ``addmm_`` would become an
    out-of-place ``addmm`` that first copies its whole accumulator) nor bakes the module switches it reads into the
    graph (they keep working after compilation). ``fake(*args)`` gives the output's shape and dtype. Eager calls
    skip the custom op's dispatch cost (the sampler makes ~1500 per call)."""

    def wrap(fn):
        try:
            op = torch.library.custom_op(f"vla_razor::{name}", mutates_args=())(fn)
            op.register_fake(fake)
        except Exception as err:  # e.g. a torch whose schema inference rejects these annotations: traced as is
            warnings.warn(f"fast_kernels: {name} runs traced inside torch.compile ({type(err).__name__}: {err})")
            return fn

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        return call

    return wrap


@_opaque_when_compiled("plus_low_rank", lambda x2, weight, *_: x2.new_empty((x2.shape[0], weight.shape[1])))
def _plus_low_rank(x2: torch.Tensor, weight: torch.Tensor, low_rank_in: torch.Tensor, low_rank_w: torch.Tensor,
                   scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 W (+ bias) + s (low_rank_in low_rank_w)`` (``[N, k] [k, m] + [N, r] [r, m]``), one product accumulated
    into the other in place (``addmm_``: the GEMM's beta=1 epilogue, no separate add pass).

    Default: the big product, then the rank-r product accumulated into it (a memory-bound pass that reads and
    writes the whole ``[N, m]`` output). :data:`LORA_LOW_RANK_FIRST`: the rank-r product first, then the big
    product adds it in its epilogue - the read hides under the compute-bound GEMM, one output pass less.
    Compiled, the functionalised ``addmm`` copied the accumulator once per LoRA projection, forward and backward:
    the 42 ms "Memcpy DtoD" of a 7B LoRA step at batch 64 (hence the opaque op).
    """
    if LORA_LOW_RANK_FIRST:
        out = low_rank_in @ (low_rank_w * scaling) if bias is None else torch.addmm(bias, low_rank_in, low_rank_w,
                                                                                    alpha=scaling)
        return out.addmm_(x2, weight)
    out = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
    return out.addmm_(low_rank_in, low_rank_w, alpha=scaling)


@_opaque_when_compiled("adapter_grad", lambda left, right: left.new_empty((left.shape[1], right.shape[1])))
def _adapter_grad(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left^T right`` (``[N, p]``, ``[N, q]`` -> ``[p, q]``): an adapter's weight gradient, a long reduction over the
    N = batch x tokens rows into a tiny output (p or q is the rank). :data:`LORA_GRAD_SPLIT` = k > 1: k batched
    products over N // k rows each (the N % k rows left over as one more product), summed in float32 (or the input's
    wider type) - k times the output tiles for the GPU to spread, in case the library's own choice leaves most of it
    idle (``benchmarks/gpu_openvla.py`` times both).
    """
    k, n = LORA_GRAD_SPLIT, left.shape[0]
    if k <= 1 or n < k:
        return left.t() @ right
    m, acc = n - n % k, torch.promote_types(left.dtype, torch.float32)
    grad = torch.bmm(left[:m].view(k, m // k, -1).transpose(1, 2), right[:m].view(k, m // k, -1)).sum(0, dtype=acc)
    if m < n:
        grad.addmm_(left[m:].t().to(acc), right[m:].to(acc))
    return grad.to(left.dtype)


class _LoRALinearFn(torch.autograd.Function):
    """``y = x W^T (+ b) + s (x A^T) B^T`` with W, b frozen; A ``[r, in]``, B ``[out, r]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)  # [N, in]
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        xa = x2 @ a.t()  # [N, r]
        y = _plus_low_rank(x2, weight.t(), xa, b.t(), scaling, bias)  # [N, out]
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # [N, out]
        dyb = dy2 @ b  # [N, r]
        dx = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            dx = _plus_low_rank(dy2, weight, dyb, a, s).view(ctx.x_shape)  # [N, in]
        if ctx.needs_input_grad[3]:
            grad_a = _adapter_grad(dyb, x2).mul_(s).to(ctx.dtypes[0])  # [r, in]
        if ctx.needs_input_grad[4]:
            grad_b = _adapter_grad(dy2, xa).mul_(s).to(ctx.dtypes[1])  # [out, r]
        return dx, None, None, grad_a, grad_b, None


def _fused_lora_parts(module) -> tuple | None:
    """``(weight, bias, lora_a, lora_b, scaling)`` of a module :func:`fuse_lora_linears` routed, while its adapter
    is active and unmerged; else None."""
    if "_unfused_forward" not in module.__dict__ or module.disable_adapters or module.merged:
        return None
    name = module.active_adapters[0]
    base = module.base_layer
    return base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])


def _fused_lora_forward(self, x, *args, **kwargs):
    """Replacement for peft ``lora.Linear.forward`` (single active vanilla adapter, no dropout)."""
    parts = None if args or kwargs else _fused_lora_parts(self)
    if parts is None:
        return self._unfused_forward(x, *args, **kwargs)
    return _LoRALinearFn.apply(x, *parts)


def fuse_lora_linears(model) -> int:
    """Route every eligible peft ``lora.Linear`` through :class:`_LoRALinearFn`; returns the count.

    Eligible: exactly one active adapter, no dropout, no variant (DoRA etc.), frozen base weight.
    Others keep peft's forward. Undo with :func:`unfuse_lora_linears`.
    """
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or len(module.active_adapters) != 1:
            continue
        name = module.active_adapters[0]
        if (
            name not in module.lora_A
            or not isinstance(module.lora_dropout[name], torch.nn.Identity)
            or name in getattr(module, "lora_variant", {})
            or module.base_layer.weight.requires_grad
        ):
            continue
        if "_unfused_forward" not in module.__dict__:
            module._unfused_forward = module.forward
        module.forward = types.MethodType(_fused_lora_forward, module)
        count += 1
    return count


def unfuse_lora_linears(model) -> None:
    """Restore peft's own forward on modules changed by :func:`fuse_lora_linears`."""
    for module in model.modules():
        if "_unfused_forward" in module.__dict__:
            module.forward = module.__dict__.pop("_unfused_forward")


def decoder_layers(model, suffixes: tuple[str, ...] = ("DecoderLayer",)) -> list[torch.nn.Module]:
    """Every module whose class name ends with one of ``suffixes``, in module order (last = the output side).

    Cached on ``model``: the sampler and the teacher-forced forward ask on every call, and walking the 7B's ~1000
    modules costs ~1 ms. Layers are fixed once a model is built (adapters and sharding change what is inside them);
    a deep copy copies the cache along with the layers it names.
    """
    key = tuple(suffixes)
    cache = model.__dict__.setdefault("_layers_by_suffix", {})
    if key not in cache:
        cache[key] = [m for m in model.modules() if type(m).__name__.endswith(key)]
    return cache[key]


def compile_decoder_layers(
    model, enable: bool = True, dynamic: bool | None = None, suffixes: tuple[str, ...] = ("DecoderLayer",),
    last_eager: bool = False,
) -> int:
    """Regionally ``torch.compile`` (or un-compile) every module whose class name ends with one of
    ``suffixes`` (default ``*DecoderLayer``; add ``"EncoderLayer"`` for the vision tower); returns the count.
    ``last_eager``: leave the last matching layer uncompiled - a compiled layer does not run hooks on its
    sub-modules, and :func:`policies.openvla_fast.last_layer_rows` trims the last layer through hooks.

    Identical layers share one compiled graph, so compile time is one layer's, not 32. Meant for
    cache-free calls (teacher forcing, training): with a KV cache each layer's ``layer_idx``
    would specialise the graph per layer.
    """
    _raise_recompile_limit()
    layers = decoder_layers(model, suffixes)
    for i, module in enumerate(layers):
        if enable and not (last_eager and i == len(layers) - 1):
            module.compile(dynamic=dynamic)
        else:
            module._compiled_call_impl = None
    return len(layers) - (1 if enable and last_eager and layers else 0)


def contiguous_output(module: torch.nn.Module):
    """Make ``module``'s output contiguous (a forward hook; returns its handle, ``.remove()`` undoes it)."""
    return module.register_forward_hook(lambda _module, _args, out: out.contiguous())


PATCH_EMBEDDINGS = ("PatchEmbed", "VisionEmbeddings")  # timm's (OpenVLA's remote code), transformers' SigLIP / CLIP


def contiguous_patch_embeddings(model) -> list:
    """Hooks making every patch embedding's output contiguous; returns their handles.

    timm and transformers return ``conv(x).flatten(2).transpose(1, 2)``, a transposed view whose layout every
    residual add keeps, so each LayerNorm of the tower copies its input back: two strided copies and two mixed-layout
    adds per block (SigLIP, which has no prefix token to concatenate). One copy at the embedding replaces them; the
    values are unchanged.
    """
    return [contiguous_output(m) for m in model.modules() if type(m).__name__.endswith(PATCH_EMBEDDINGS)]


def _accumulate_linear(module, x: torch.Tensor, out2: torch.Tensor) -> bool:
    """``out2 += module(x)`` in place (``out2``: ``[N, out]``), the add done by the GEMM itself (``addmm_``, beta=1);
    for a plain ``nn.Linear`` or a fused LoRA linear. Returns False, touching nothing, for any other module."""
    if type(module) is torch.nn.Linear:
        weight, bias, lora = module.weight, module.bias, None
    else:
        parts = _fused_lora_parts(module)
        if parts is None:
            return False
        weight, bias, lora = parts[0], parts[1], parts[2:]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != out2.shape[0] or tuple(weight.shape) != (out2.shape[1], x2.shape[1]):
        return False
    out2.addmm_(x2, weight.t())
    if lora is not None:
        lora_a, lora_b, scaling = lora
        out2.addmm_(x2 @ lora_a.to(x.dtype).t(), lora_b.to(x.dtype).t(), alpha=scaling)
    if bias is not None:
        out2.add_(bias)
    return True


@contextmanager
def _forward_replaced(module: torch.nn.Module, make_forward) -> Iterator[None]:
    """Inside, ``module``'s forward is ``make_forward(regular)``, ``regular`` being the forward it had (an
    instance-level one, e.g. a fused LoRA linear's, or its class's); restored on exit."""
    own = module.__dict__.get("forward")
    module.forward = make_forward(own if own is not None else module.forward)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _accumulating_into(module: torch.nn.Module, residual: torch.Tensor):
    """Context: inside, ``module(x)`` adds its output to ``residual`` in place and returns ``residual``."""
    out2 = residual.view(-1, residual.shape[-1])

    def make_forward(regular):
        def forward(x, *args, **kwargs):
            if args or kwargs or not _accumulate_linear(module, x, out2):
                out2.add_(regular(x, *args, **kwargs).reshape(out2.shape))
            return residual

        return forward

    return _forward_replaced(module, make_forward)


def _epilogue_layer_forward(layer, regular, hidden_states, *args, **kwargs):
    """A Llama decoder layer whose two residual adds happen in the epilogues of ``o_proj`` and ``down_proj``."""
    attn, mlp = layer.self_attn, layer.mlp
    if (args or torch.is_grad_enabled() or not hidden_states.is_contiguous()
            or getattr(attn.o_proj, "_tail_rows", None) is not None or getattr(mlp, "_tail_rows", None) is not None):
        return regular(hidden_states, *args, **kwargs)
    residual = hidden_states  # updated in place: the layer's input is the previous layer's output (or the embeddings)
    with _accumulating_into(attn.o_proj, residual):
        attn(hidden_states=layer.input_layernorm(residual), **kwargs)
    with _accumulating_into(mlp.down_proj, residual):
        mlp(layer.post_attention_layernorm(residual))
    return residual


@functools.cache
def _layers_return_tensors() -> bool:
    """transformers' decoder layers return the hidden states themselves (a tuple before 4.56)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release >= (4, 56)


@contextmanager
def residual_adds_in_epilogue(model) -> Iterator[None]:
    """Inside, without autograd, every Llama decoder layer of ``model`` adds its attention and MLP outputs to the
    residual stream inside the ``o_proj`` / ``down_proj`` GEMMs (``addmm_`` into the stream, in place) instead of
    with a separate ``residual + out`` pass: per layer two element-wise passes over ``[B*T, d]`` (read, read, write)
    fewer - ~114 GB of a batch-256 OpenVLA prefill. One rounding fewer too (the GEMM adds in float32).

    For calls whose hidden states nobody else holds - the sampler's prefill (the stream is updated in place, the
    embeddings included; requested hidden states would be overwritten). Layers that are being trimmed
    (``_tail_rows``), called with grad enabled or with positional extras run their own forward. Needs transformers'
    tensor-returning decoder layers (>= 4.56).
    """
    with ExitStack() as stack:
        for layer in decoder_layers(model) if _layers_return_tensors() else ():
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            parts = (getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None),
                     getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
            if all(part is not None for part in parts):
                stack.enter_context(_forward_replaced(
                    layer, lambda regular, layer=layer: functools.partial(_epilogue_layer_forward, layer, regular)))
        yield


@contextmanager
def uncompiled(model, suffixes: tuple[str, ...] = ("DecoderLayer",)) -> Iterator[None]:
    """Inside, the layers :func:`compile_decoder_layers` compiled (class names ending with ``suffixes``) run eagerly.

    For KV-cache decoding: a compiled decoder layer would specialise its graph on its layer index and on the growing
    cache length (one graph per layer per step); the sampler's prefill and decode use the fused ops instead. Vision
    layers see fixed shapes and stay compiled.
    """
    compiled = [(m, m._compiled_call_impl) for m in decoder_layers(model, suffixes) if m._compiled_call_impl is not None]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call

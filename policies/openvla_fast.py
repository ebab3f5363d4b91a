"""Fast action sampling, action log-probs and REINFORCE updates for Llava-style VLA policies.

OpenVLA emits an action as ``num_tokens`` (7) tokens drawn from the last 256 ids of the Llama
vocabulary (31744..31999). Everything a policy-gradient loop needs from the language model is
therefore a distribution over those K = 256 ids at 7 positions, and the functions here never
compute the full-vocabulary head:

* :func:`sample_action_tokens` - one prefill of image + prompt, then ``num_tokens - 1`` cached
  decode steps; the head is ``lm_head.weight[action_token_ids]`` ([K, d]) applied to one position.
  The KV cache is pre-allocated for ``T + num_tokens - 1`` positions and written in place
  (:class:`PreallocatedKVCache`), so a decode step does not re-concatenate the whole cache.
* :func:`action_token_log_probs` - ONE teacher-forced forward over image + prompt + actions; the
  head is applied only to the ``num_tokens`` positions that predict action tokens
  (``hidden[:, -num_tokens-1:-1]``, i.e. OpenVLA's ``logits[:, -8:-1]`` restricted to K ids).
* :func:`reinforce_loss` / :func:`reinforce_step` - ``loss = -mean_b(A_b * sum_t log pi(a_bt))``
  (Williams 1992, REINFORCE), for full fine-tuning or adapters alike.

The functions are model-agnostic over Hugging Face Llava-style models: the model must expose the
multimodal body as ``model.model`` (returning ``last_hidden_state``) and the head through
``get_output_embeddings()``; a peft ``PeftModel`` wrapper is unwrapped. Batches must be LEFT
padded (padding on the left, action tokens last); positions are derived from the attention mask,
as Hugging Face ``generate`` does.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies.fast_kernels import decoder_layers, residual_adds_in_epilogue, uncompiled
from vla_razor.policy import token_log_probs

__all__ = [
    "PreallocatedKVCache",
    "clear_decode_graphs",
    "last_layer_rows",
    "action_head_weight",
    "action_token_log_probs",
    "ReinforceBatch",
    "position_ids_from_mask",
    "reinforce_loss",
    "reinforce_step",
    "sample_action_tokens",
    "tokens_to_action_index",
]


def _unwrap(model):
    """Return the Hugging Face model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _body(model):
    """The multimodal body (vision tower + projector + language model, no head)."""
    inner = _unwrap(model)
    body = getattr(inner, "model", None)
    if body is None:
        raise ValueError(f"{type(inner).__name__} has no `.model` body; expected a Llava-style model")
    return body


def _cache_kwarg(body) -> str:
    """Name of the KV-cache argument: transformers >= 5.2x renamed `past_key_values` to `cache`."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_from(out):
    cache = out.get("cache", None)
    return cache if cache is not None else out.get("past_key_values", None)


KV_LAYOUT = "token"  # "token": buffer [B, max_len, H, D] (the projections' memory order); "head": [B, H, max_len, D]
# The prefill's cache write goes to a slice of the buffer (max_len > prompt length), which torch's copy kernel handles
# unvectorized (~1 TB/s on an H200: GPU runs 4-6 saw 80 ms of such copies per b256 call, ~74 GB of them K/V);
# "compiled" writes it with an inductor kernel instead. A benchmark switch until a GPU run measures it.
KV_WRITE = "eager"
# The prefill's residual adds inside the o_proj / down_proj GEMMs (fast_kernels.residual_adds_in_epilogue): ~114 GB of
# element-wise traffic less per b256 call. A benchmark switch until a GPU run measures it.
RESIDUAL_EPILOGUE = False
# The attention kernel the sampler tries first: None keeps PyTorch's order (cuDNN on an H200); "flash" puts
# FlashAttention-2 first. Runs 4-6 (b256): the decode steps' cuDNN kernel read the KV cache at ~3.2 TB/s (71 ms per
# call; ~48 ms at the H200's 4.8 TB/s) and the prefill's ran at ~2 TB/s. A benchmark switch until a GPU run measures it.
ATTENTION_FIRST: str | None = None


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


_COMPILED_COPY: list = []


def _write_prefill(dst: torch.Tensor, src: torch.Tensor) -> None:
    if KV_WRITE != "compiled":
        dst.copy_(src)
        return
    if not _COMPILED_COPY:
        _COMPILED_COPY.append(torch.compile(_copy_into, dynamic=False))
    _COMPILED_COPY[0](dst, src)


def _preallocated_layer_class():
    """Build the layer class lazily: transformers is imported only when a cache is made."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A :class:`DynamicLayer` whose keys/values live in one buffer, exposed as ``[B, H, max_len, D]``.

        The buffer's memory is token-major (``[B, max_len, H, D]``, :data:`KV_LAYOUT`), the order in which
        the key/value projections produce the states: the prefill's write is then a plain block copy
        (run 5: a head-major buffer made it a strided transpose, ~90 ms per batch of 256 on an H200),
        and attention kernels read that layout natively.

        ``update`` copies the new states into the buffer in place and exposes ``buffer[:, :, :len]``
        views as ``keys``/``values`` - the same tensors a ``DynamicLayer`` would hold, without the
        ``torch.cat`` that copies the whole cache at every decode step. Everything else (mask sizes,
        sequence length) is inherited, so the model builds exactly the masks it builds for a
        ``DynamicCache``.
        """

        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = int(max_len)
            self.length = 0

        def lazy_initialization(self, key_states, value_states, *args, **kwargs):
            b, h, _, d = key_states.shape
            hv, dv = value_states.shape[1], value_states.shape[-1]
            self.dtype, self.device = key_states.dtype, key_states.device
            if KV_LAYOUT == "token":
                self._k = key_states.new_empty(b, self.max_len, h, d).transpose(1, 2)
                self._v = value_states.new_empty(b, self.max_len, hv, dv).transpose(1, 2)
            else:
                self._k = key_states.new_empty(b, h, self.max_len, d)
                self._v = value_states.new_empty(b, hv, self.max_len, dv)
            self.is_initialized = True
            self.truncate(0)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.max_len:
                raise ValueError(f"PreallocatedKVCache overflow: {end} positions > max_len={self.max_len}")
            first = self.length == 0
            write = _write_prefill if first else torch.Tensor.copy_
            write(self._k[:, :, self.length : end], key_states)
            write(self._v[:, :, self.length : end], value_states)
            self.truncate(end)
            if first:  # the prefill attends over the states it was given: contiguous, unlike a view of the buffer
                return key_states, value_states
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def truncate(self, length: int) -> None:
            """Keep the first ``length`` positions (the buffer itself is untouched)."""
            self.length = length
            if self.is_initialized:
                self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

        def reset(self) -> None:
            self.truncate(0)

    return PreallocatedLayer


def PreallocatedKVCache(num_layers: int, max_len: int):  # noqa: N802 (factory named like the class it makes)
    """A transformers ``DynamicCache`` whose ``num_layers`` layers are pre-allocated for ``max_len``
    positions (allocated at the first write, with the batch/head shapes of the prefill)."""
    from transformers.cache_utils import DynamicCache

    layer_cls = _preallocated_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_cls(max_len) for _ in range(num_layers)]
    return cache


def _num_text_layers(body) -> int:
    cfg = getattr(body, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise ValueError("cannot find num_hidden_layers on the model config; pass kv_cache='dynamic'")
    return int(n)


def _tail_rows_pre(module, args):
    rows = getattr(module, "_tail_rows", None)
    return None if rows is None else (args[0][:, -rows[0]:],) + tuple(args[1:])


def _tail_rows_post(module, args, out):
    rows = getattr(module, "_tail_rows", None)
    return None if rows is None else F.pad(out, (0, 0, rows[1] - out.shape[1], 0))


@contextmanager
def last_layer_rows(body, keep: int, seq_len: int):
    """Run the last decoder layer's output projection and MLP on the last ``keep`` of ``seq_len`` positions.

    Only those positions reach the action head, and every layer's keys and values (the KV cache, and
    what the kept positions attend to) come from the layer inputs, which stay whole - so the result
    at the kept positions is unchanged while ~2 % of the forward's matrix FLOPs (o_proj + MLP of one
    of 32 layers, for all other positions) are skipped. The skipped rows are zero-padded back, so
    shapes and the residual stream are what the model expects; hidden states at the other positions
    of the LAST layer are meaningless inside the context. The hooks stay installed (fixed functions,
    state in one attribute) so a ``torch.compile``-d layer sees the same hooks on every call.
    A no-op for models without ``o_proj``/``mlp`` and for a gradient-checkpointed last layer in training.
    """
    layers = decoder_layers(body)
    layer = layers[-1] if layers else None
    attn = getattr(layer, "self_attn", None) if layer is not None else None
    targets = [m for m in (getattr(attn, "o_proj", None), getattr(layer, "mlp", None)) if m is not None]
    # a checkpointed layer recomputes its forward during backward, outside this context: leave it whole
    checkpointed = getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()
    if len(targets) != 2 or not 0 < keep < seq_len or checkpointed:
        yield
        return
    for module in targets:
        if not getattr(module, "_tail_rows_hooked", False):
            module.register_forward_pre_hook(_tail_rows_pre)
            module.register_forward_hook(_tail_rows_post)
            module._tail_rows_hooked = True
        module._tail_rows = (int(keep), int(seq_len))
    try:
        yield
    finally:
        for module in targets:
            module._tail_rows = None


def action_head_weight(model, action_token_ids: torch.Tensor) -> torch.Tensor:
    """Rows of the output embedding for the action ids: ``[K, d]`` (autograd flows into the head)."""
    head = _unwrap(model).get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("output head with a bias is not supported (Llama's lm_head has none)")
    return head.weight[action_token_ids.to(head.weight.device)]


def _logit_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16/fp32 models; float64 for a float64 (reference) model."""
    return torch.promote_types(x.dtype, torch.float32)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions for a left-padded batch: ``[B, T]``, 0 at the first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def tokens_to_action_index(tokens: torch.Tensor, action_token_ids: torch.Tensor) -> torch.Tensor:
    """Map vocabulary ids ``[...]`` to indices in ``action_token_ids`` ``[...]`` (0..K-1).

    Raises ValueError when a token is not an action id (this reads back one bool from the device).
    """
    match = tokens.unsqueeze(-1) == action_token_ids.to(tokens.device)  # [..., K]
    if not bool(match.any(-1).all()):
        bad = tokens[~match.any(-1)][:5].tolist()
        raise ValueError(f"tokens {bad} are not among the {action_token_ids.numel()} action token ids")
    return match.int().argmax(-1)


def _check_batch(input_ids, attention_mask, pixel_values):
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be [B, T]"
        )
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(f"pixel_values batch {pixel_values.shape[0]} != input_ids batch {input_ids.shape[0]}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("batch must be left padded: attention_mask[:, -1] has zeros")


def _set_cache_length(cache, length: int) -> None:
    for layer in cache.layers:
        layer.truncate(length)


class _DecodeGraphs:
    """The ``steps`` decode steps for one (model, batch, prompt length), captured as CUDA graphs.

    Why: at batch 256 a decode step moves the weights and ~37 GB of KV cache once - about 11 ms on an
    H200 - while Hugging Face's eager layers take longer than that to launch from Python. A graph
    replays the whole step from one launch. Each step's graph reads the token from ``ids`` and writes
    its keys/values at its fixed offset of the pre-allocated ``cache``, which the (eager) prefill
    refills on every call; weights are read in place, so optimizer steps need no re-capture.
    """

    def __init__(self, body, cache_name: str, cache, prompt_len: int, steps: int, batch: int, device):
        import weakref

        self.body_ref = weakref.ref(body)
        self.cache, self.cache_name = cache, cache_name
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the main stream first, as torch.cuda.graph requires
            self._step(body)
        torch.cuda.current_stream(device).wait_stream(stream)
        _set_cache_length(cache, prompt_len)
        pool = torch.cuda.graph_pool_handle()
        self.graphs, self.hidden = [], []
        for _ in range(steps):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._step(body)
            self.graphs.append(graph)
            self.hidden.append(hidden)
        _set_cache_length(cache, prompt_len)

    def _step(self, body):
        out = body(input_ids=self.ids, use_cache=True, **{self.cache_name: self.cache})
        return out.last_hidden_state[:, -1]

    def replay(self, step: int, token: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(token)
        self.graphs[step].replay()
        return self.hidden[step]


_DECODE_GRAPHS: dict[tuple, _DecodeGraphs | None] = {}  # None: capture failed for that key, decode eagerly


def clear_decode_graphs() -> None:
    """Free every captured decode graph and its KV cache (call after replacing a model's weight tensors)."""
    _DECODE_GRAPHS.clear()


def _attention_first():
    """A context in which scaled-dot-product attention tries :data:`ATTENTION_FIRST`'s kernel first, then PyTorch's
    others (any still serves inputs the first cannot); CUDA-graph decode steps keep the kernels of their capture."""
    if ATTENTION_FIRST is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                   efficient=SDPBackend.EFFICIENT_ATTENTION, math=SDPBackend.MATH)
    if ATTENTION_FIRST not in kernels:
        raise ValueError(f"ATTENTION_FIRST must be None or one of {sorted(kernels)}, got {ATTENTION_FIRST!r}")
    first = kernels[ATTENTION_FIRST]
    return sdpa_kernel([first] + [k for k in kernels.values() if k != first], set_priority=True)


def _sampling_setup(fn):
    """Run ``fn(model, ...)`` with the model's regionally compiled layers eager (:func:`uncompiled`: compiled for
    cache-free teacher forcing, a layer would recompile per layer index and cache length in a KV-cache decode) and
    attention kernels in :data:`ATTENTION_FIRST`'s order."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with uncompiled(_body(model)), _attention_first():
            return fn(model, *args, **kwargs)

    return wrapper


@_sampling_setup
@torch.no_grad()
def sample_action_tokens(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_token_ids: torch.Tensor,
    num_tokens: int = 7,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    kv_cache: str = "static",
    tokens: torch.Tensor | None = None,
    greedy: bool = False,
    trim_last_layer: bool = True,
    cuda_graphs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_tokens`` action tokens per row, restricted to ``action_token_ids``.

    Args:
        pixel_values: ``[B, C, H, W]`` images.
        input_ids: ``[B, T]`` left-padded prompt (image placeholders + text), no action tokens.
        attention_mask: ``[B, T]``, 1 for real tokens.
        action_token_ids: ``[K]`` vocabulary ids of the action bins (OpenVLA: 31744..31999).
        temperature: logits are divided by it before sampling; > 0.
        generator: optional ``torch.Generator`` on the model's device, for reproducible draws.
        kv_cache: ``"static"`` (default) - a cache pre-allocated for ``T + num_tokens - 1`` positions
            and written in place; ``"dynamic"`` - transformers' ``DynamicCache`` (concatenates the
            whole cache at every step; kept for comparison).
        tokens: optional ``[B, num_tokens]`` action ids to score instead of drawing (the same
            prefill + decode computation; used to compare numerics on fixed tokens).
        greedy: take the most likely id at each step instead of drawing (evaluation).
        trim_last_layer: run the last layer's output projection and MLP on the last prompt position
            only in the prefill (:func:`last_layer_rows`; same result, ~2 % fewer FLOPs).
        cuda_graphs: replay the decode steps as CUDA graphs (:class:`_DecodeGraphs`), captured at the
            first call for each (model, batch, prompt length) and kept, with their KV cache, until
            :func:`clear_decode_graphs`. Used on CUDA for unpadded batches with the static cache;
            otherwise, or if capture fails, the steps run eagerly.

    Returns:
        tokens ``[B, num_tokens]`` (vocabulary ids, all in ``action_token_ids``) and their
        log-probabilities ``[B, num_tokens]`` (float32; float64 for a float64 model) under the tempered, action-restricted
        distribution - the same quantity :func:`action_token_log_probs` recomputes.

    Cost: one prefill of T tokens plus ``num_tokens - 1`` decode steps of one token; the head is
    a ``[B, d] x [d, K]`` product per step instead of ``[B, T, d] x [d, V]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kv_cache not in ("static", "dynamic"):
        raise ValueError(f"kv_cache must be 'static' or 'dynamic', got {kv_cache!r}")
    _check_batch(input_ids, attention_mask, pixel_values)
    if tokens is not None and tuple(tokens.shape) != (input_ids.shape[0], num_tokens):
        raise ValueError(f"tokens {tuple(tokens.shape)} must be [B, num_tokens] = [{input_ids.shape[0]}, {num_tokens}]")
    body = _body(model)
    cache_name = _cache_kwarg(body)
    w_act = action_head_weight(model, action_token_ids)  # [K, d]
    ids_dev = action_token_ids.to(input_ids.device)
    batch = input_ids.shape[0]

    forced = None if tokens is None else tokens_to_action_index(tokens, action_token_ids)  # [B, N]

    position_ids = position_ids_from_mask(attention_mask)  # [B, T]
    # Without padding, pass no mask and no positions (the model's defaults: causal, 0..T-1, then the
    # cache length): transformers then needs no host read of the mask at each step (`mask.all()`),
    # so the decode steps are queued while the GPU still runs the prefill. Same numerics: for an
    # all-ones mask transformers drops the mask and uses SDPA's causal path anyway.
    padded = not bool(attention_mask.all())
    cache_arg = {}
    graphs_key = (id(body), batch, input_ids.shape[1], num_tokens, str(input_ids.device))
    use_graphs = (cuda_graphs and kv_cache == "static" and not padded and num_tokens > 1
                  and input_ids.device.type == "cuda" and _DECODE_GRAPHS.get(graphs_key, 0) is not None)
    graphs = _DECODE_GRAPHS.get(graphs_key) if use_graphs else None
    if graphs is not None and graphs.body_ref() is not body:  # a new model at a recycled id
        del _DECODE_GRAPHS[graphs_key]
        graphs = None
    if graphs is not None:
        _set_cache_length(graphs.cache, 0)
        cache_arg[cache_name] = graphs.cache
    elif kv_cache == "static":
        cache_arg[cache_name] = PreallocatedKVCache(_num_text_layers(body), input_ids.shape[1] + num_tokens - 1)
    with (last_layer_rows(body, 1, input_ids.shape[1]) if trim_last_layer else nullcontext(),
          residual_adds_in_epilogue(body) if RESIDUAL_EPILOGUE else nullcontext()):
        out = body(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask if padded else None,
            position_ids=position_ids if padded else None,
            use_cache=True,
            **cache_arg,
        )
    cache = _cache_from(out)
    if use_graphs and graphs is None:
        try:
            graphs = _DecodeGraphs(body, cache_name, cache, input_ids.shape[1], num_tokens - 1, batch, input_ids.device)
        except Exception as err:  # e.g. a host sync inside the model: decode eagerly from now on
            import warnings

            warnings.warn(f"CUDA-graph capture of the decode step failed ({type(err).__name__}: {err}); decoding eagerly")
            torch.cuda.synchronize(input_ids.device)
            _set_cache_length(cache, input_ids.shape[1])
        _DECODE_GRAPHS[graphs_key] = graphs
    hidden = out.last_hidden_state[:, -1]  # [B, d]
    next_pos = position_ids[:, -1:] + 1  # [B, 1]
    mask = attention_mask

    drawn, log_probs = [], []
    for step in range(num_tokens):
        logits = (hidden @ w_act.t()).to(_logit_dtype(hidden)) / temperature  # [B, K]
        logp = torch.log_softmax(logits, dim=-1)  # [B, K]
        if forced is None and greedy:
            idx = torch.argmax(logp, dim=-1, keepdim=True)
        elif forced is None:
            # Gumbel-max draw: argmax(logp + G) ~ Categorical(softmax(logp)); no host sync.
            u = torch.rand(logp.shape, device=logp.device, generator=generator)
            gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))
            idx = torch.argmax(logp + gumbel, dim=-1, keepdim=True)  # [B, 1]
        else:
            idx = forced[:, step : step + 1]
        drawn.append(ids_dev[idx])  # [B, 1]
        log_probs.append(logp.gather(-1, idx))  # [B, 1]
        if step == num_tokens - 1:
            break
        if graphs is not None:
            hidden = graphs.replay(step, drawn[-1])
            continue
        if padded:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # [B, T + step + 1]
        out = body(
            input_ids=drawn[-1],
            attention_mask=mask if padded else None,
            position_ids=next_pos if padded else None,
            use_cache=True,
            **{cache_name: cache},
        )
        cache = _cache_from(out)
        hidden = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return torch.cat(drawn, dim=1), torch.cat(log_probs, dim=1)


def action_token_log_probs(
    model,
    pixel_values: torch.Tensor,
    input_ids_with_actions: torch.Tensor,
    attention_mask: torch.Tensor,
    action_token_ids: torch.Tensor,
    num_tokens: int = 7,
    temperature: float = 1.0,
    trim_last_layer: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the last ``num_tokens`` tokens from ONE teacher-forced forward.

    Args:
        pixel_values: ``[B, C, H, W]``.
        input_ids_with_actions: ``[B, T]`` left-padded prompt followed by ``num_tokens`` action ids.
        attention_mask: ``[B, T]``.
        action_token_ids: ``[K]``.
        trim_last_layer: the last layer's output projection and MLP run on the ``num_tokens + 1``
            positions the head reads (:func:`last_layer_rows`; same result, ~2 % fewer FLOPs).

    Returns:
        log_probs ``[B, num_tokens]`` (float32; float64 for a float64 model) of the given action
        tokens and the restricted, tempered logits ``[B, num_tokens, K]`` (same dtype). Differentiable (call under
        ``torch.no_grad()`` for scoring only). Hidden states at positions
        ``-num_tokens-1 .. -2`` predict the action tokens, as OpenVLA's ``logits[:, -8:-1]``.
    """
    _check_batch(input_ids_with_actions, attention_mask, pixel_values)
    if input_ids_with_actions.shape[1] <= num_tokens:
        raise ValueError(f"sequence length {input_ids_with_actions.shape[1]} must exceed num_tokens={num_tokens}")
    body = _body(model)
    with last_layer_rows(body, num_tokens + 1, input_ids_with_actions.shape[1]) if trim_last_layer else nullcontext():
        out = body(
            pixel_values=pixel_values,
            input_ids=input_ids_with_actions,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    hidden = out.last_hidden_state[:, -num_tokens - 1 : -1]  # [B, N, d]
    w_act = action_head_weight(model, action_token_ids)  # [K, d]
    logits = (hidden @ w_act.t()).to(_logit_dtype(hidden)) / temperature  # [B, N, K]
    index = tokens_to_action_index(input_ids_with_actions[:, -num_tokens:], action_token_ids)  # [B, N]
    log_probs = token_log_probs(logits, index)  # [B, N]
    return log_probs, logits


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE surrogate ``-mean_b(A_b * sum_t log pi(a_bt))`` (Williams 1992, eq. 11).

    Args:
        log_probs: ``[B, N]`` log-probs of the taken action tokens.
        advantages: ``[B]`` (treated as constants).

    Returns:
        scalar loss and float stats (``reinforce/loss``, ``reinforce/logp_mean``).
    """
    if log_probs.dim() != 2 or advantages.shape != log_probs.shape[:1]:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} must be [B, N] and advantages {tuple(advantages.shape)} [B]")
    seq_logp = log_probs.sum(-1)  # [B]
    loss = -(advantages.detach().to(seq_logp.dtype) * seq_logp).mean()
    return loss, {"reinforce/loss": loss.detach(), "reinforce/logp_mean": seq_logp.detach().mean()}


@dataclass
class ReinforceBatch:
    """One update's data: ``pixel_values [B,C,H,W]``, ``input_ids [B,T]`` (prompt + action
    tokens, left padded), ``attention_mask [B,T]``, ``advantages [B]``."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    advantages: torch.Tensor


def reinforce_step(
    model,
    optimizer: torch.optim.Optimizer,
    batch: ReinforceBatch,
    action_token_ids: torch.Tensor,
    num_tokens: int = 7,
) -> dict[str, torch.Tensor]:
    """One REINFORCE update: zero grads, teacher-forced log-probs, loss, backward, optimizer step.

    Works for full fine-tuning and for adapters: only parameters in ``optimizer`` move. Returns
    detached stats (device tensors; no host sync).
    """
    optimizer.zero_grad(set_to_none=True)
    log_probs, _ = action_token_log_probs(
        model, batch.pixel_values, batch.input_ids, batch.attention_mask, action_token_ids, num_tokens
    )
    loss, stats = reinforce_loss(log_probs, batch.advantages)
    loss.backward()
    optimizer.step()
    return stats

"""Forgetting predictors other than output divergences (the Table-1 study of RL's Razor).

Shenfeld, Pari, Agrawal (2025), "RL's Razor: Why Online Reinforcement Learning Forgets Less", compare how
well many candidate quantities predict forgetting. The output divergences (forward/reverse KL, TV, L2 between
output distributions) live in ``divergences.py``; this module holds the rest:

* weight change: L1, Fisher-weighted L2, spectral norm; sparsity and rank of the update;
* hidden-activation change (L1, L2);
* representation similarity: linear CKA and CKNNA.

Every function is pure. Scalar measures return a python ``float``; ``expected_fisher_diagonal`` returns a
parameter dict and the building block ``hsic_unbiased`` a 0-d tensor. Parameter collections are
``dict[str, Tensor]`` (name -> tensor) with the same keys and shapes in ``base`` and ``tuned``. Arithmetic is
done in at least float32: bf16/fp16 inputs are cast up first because small fine-tuning updates vanish in bf16
(PROTOCOL.md, "Divergences and other forgetting predictors"). Kernel-alignment measures (CKA, CKNNA) use
float64 because they subtract large, nearly equal sums.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "weight_change_l1",
    "weight_change_fisher_l2",
    "expected_fisher_diagonal",
    "update_spectral_norm",
    "update_sparsity",
    "update_rank",
    "update_spectrum",
    "activation_change",
    "linear_cka",
    "hsic_unbiased",
    "cknna",
]

ParamDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Detach and cast floating tensors narrower than float32 (bf16, fp16) up to float32; keep float64."""
    t = t.detach()
    if not t.is_floating_point():
        return t.to(torch.float32)
    if torch.finfo(t.dtype).bits < 32:
        return t.to(torch.float32)
    return t


def _check_same_keys(base: ParamDict, other: ParamDict, other_name: str) -> None:
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    if missing or extra:
        raise ValueError(
            f"parameter dicts differ: keys only in base: {missing}; keys only in {other_name}: {extra}. "
            "Pass state dicts of the same architecture (e.g. both from model.named_parameters())."
        )


def _deltas(base: ParamDict, tuned: ParamDict) -> dict[str, torch.Tensor]:
    """Return {name: tuned - base} in at least float32, after checking keys and shapes."""
    _check_same_keys(base, tuned, "tuned")
    out = {}
    for name in base:
        b, t = base[name], tuned[name]
        if b.shape != t.shape:
            raise ValueError(
                f"parameter {name!r}: base shape {tuple(b.shape)} != tuned shape {tuple(t.shape)}"
            )
        out[name] = _upcast(t) - _upcast(b)
    return out


def _as_matrix(delta: torch.Tensor) -> torch.Tensor | None:
    """[d0, d1, ...] -> [d0, d1*...] for ndim >= 2 (conv kernels are matricized per output channel);
    None for scalars and vectors (biases, norm gains), which have no meaningful spectrum."""
    if delta.ndim < 2:
        return None
    return delta.reshape(delta.shape[0], -1)


def _check_2d_pair(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"expected {x_name}: [N, D1] and {y_name}: [N, D2] with the same N, "
            f"got {x_name} {tuple(x.shape)} and {y_name} {tuple(y.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------
# weight change
# ----------------------------------------------------------------------------------------------------------
def weight_change_l1(base: ParamDict, tuned: ParamDict) -> float:
    """L1 weight change: sum over all parameter entries of |tuned - base|.

    Args:
        base, tuned: {name: Tensor[*shape_name]}, same keys and shapes.
    Returns:
        float, >= 0; 0 iff the parameters are identical.
    """
    # per-tensor sums are accumulated as python floats (float64) so 7B entries do not lose precision
    return float(sum(d.abs().sum().item() for d in _deltas(base, tuned).values()))


def weight_change_fisher_l2(base: ParamDict, tuned: ParamDict, fisher: ParamDict) -> float:
    """Fisher-weighted squared L2 weight change: sum over entries of F * (tuned - base)**2.

    This is the quadratic (EWC-style) approximation of how much the update costs the task the Fisher was
    measured on (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks").
    PROTOCOL.md: F is the diagonal Fisher of the BASE model over PRIOR-task inputs, see
    ``expected_fisher_diagonal``.

    Args:
        base, tuned, fisher: {name: Tensor[*shape_name]}, same keys and shapes; fisher >= 0.
    Returns:
        float, >= 0.
    """
    deltas = _deltas(base, tuned)
    _check_same_keys(base, fisher, "fisher")
    total = 0.0
    for name, d in deltas.items():
        f = fisher[name]
        if f.shape != d.shape:
            raise ValueError(
                f"parameter {name!r}: fisher shape {tuple(f.shape)} != parameter shape {tuple(d.shape)}"
            )
        total += (_upcast(f) * d.square()).sum().item()
    return float(total)


def expected_fisher_diagonal(
    logits_fn: Callable[[ParamDict, torch.Tensor], torch.Tensor],
    params: ParamDict,
    inputs: torch.Tensor,
    chunk_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Exact diagonal of the TRUE (expected) Fisher information of a categorical policy.

        F = (1/N) sum_n sum_y pi(y|x_n) * (d/dtheta log pi(y|x_n))**2        (elementwise square)

    The expectation over y ~ pi(.|x) is computed exactly by summing over all K outputs, not by sampling and
    not with the dataset labels (the "empirical" Fisher, which is a different quantity; see Kunstner et al.
    2019, "Limitations of the empirical Fisher approximation"). Per-sample Jacobians of the K log-probs come
    from torch.func (vmap over the chunk of jacrev, i.e. K per-sample gradients), so memory is
    O(chunk_size * K * num_params); it is meant for small output sets (ParityMNIST's 10 classes, a few
    action-token bins), not a whole LLM vocabulary.

    PROTOCOL.md: call it with the BASE model's parameters and PRIOR-task inputs.

    Args:
        logits_fn: functional model ``logits_fn(params, x: [B, ...]) -> [B, K]``, e.g.
            ``lambda p, x: torch.func.functional_call(model, p, (x,))``. It must treat samples independently
            (no batch norm in training mode), since it is vmapped over single samples.
        params: {name: Tensor[*shape_name]} at which the Fisher is evaluated (cast up to >= float32).
        inputs: [N, ...] with N >= 1.
        chunk_size: samples per vmapped chunk (bounds memory).
    Returns:
        {name: Tensor[*shape_name]} float (>= float32), same keys and shapes as params, entries >= 0.
    """
    # torch.func pulls in torch._dynamo (seconds of import); only this predictor needs it
    from torch.func import jacrev, vmap

    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be [N, ...] with N >= 1, got shape {tuple(inputs.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    p = {name: _upcast(t) for name, t in params.items()}
    x_all = _upcast(inputs) if inputs.is_floating_point() else inputs

    def log_probs_one(p_: ParamDict, x: torch.Tensor) -> torch.Tensor:
        # x: [...] one sample -> [K]
        logits = logits_fn(p_, x.unsqueeze(0))  # [1, K]
        return torch.log_softmax(logits, dim=-1).squeeze(0)

    # jacobian of the K log-probs w.r.t. every parameter, per sample: {name: [B, K, *shape]}
    per_sample_jac = vmap(jacrev(log_probs_one), in_dims=(None, 0))

    fisher = {name: torch.zeros_like(t) for name, t in p.items()}
    n = x_all.shape[0]
    for start in range(0, n, chunk_size):
        x = x_all[start : start + chunk_size]  # [B, ...]
        with torch.no_grad():
            logits = logits_fn(p, x)  # [B, K]
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"logits_fn must return [B, K] for inputs [B, ...]; got logits {tuple(logits.shape)} "
                f"for inputs {tuple(x.shape)}"
            )
        # pi(y|x) weights the squared scores; it is a constant of the expectation, never differentiated
        probs = torch.softmax(logits, dim=-1)  # [B, K]
        jac = per_sample_jac(p, x)
        for name, j in jac.items():
            w = probs.reshape(probs.shape + (1,) * (j.ndim - 2)).to(j.dtype)  # [B, K, 1, ...]
            fisher[name] += (w * j.square()).sum(dim=(0, 1))
    return {name: f / n for name, f in fisher.items()}


def update_spectral_norm(base: ParamDict, tuned: ParamDict) -> float:
    """Sum over weight matrices of the largest singular value of the update, sum_W ||dW||_2.

    Only parameters with ndim >= 2 count; tensors with ndim > 2 (conv kernels) are matricized to
    [out_channels, -1]. Scalars and 1-D parameters (biases, LayerNorm gains) are skipped: a vector's
    "spectral norm" is just its L2 norm and would mix a different quantity into the sum.

    Args:
        base, tuned: {name: Tensor[*shape_name]}, same keys and shapes.
    Returns:
        float, >= 0 (0.0 when there is no matrix parameter).
    """
    return update_spectrum(base, tuned)["update_spectral_norm"]


def update_sparsity(base: ParamDict, tuned: ParamDict, atol: float = 1e-8, rtol: float = 1e-5) -> float:
    """Fraction of parameter entries left unchanged by fine-tuning.

    An entry counts as unchanged iff |tuned - base| <= atol + rtol * |base|, the torch.isclose rule with its
    default tolerances: the relative part ignores round-off that scales with the weight, the absolute part
    handles weights that are ~0. The comparison is in >= float32, so updates that bf16 storage would round
    away still count as changes when the checkpoints themselves are fp32 (PROTOCOL.md).

    Args:
        base, tuned: {name: Tensor[*shape_name]}, same keys and shapes.
        atol, rtol: tolerances, >= 0.
    Returns:
        float in [0, 1]; 1.0 for identical parameters.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
    deltas = _deltas(base, tuned)
    unchanged, total = 0, 0
    for name, d in deltas.items():
        tol = atol + rtol * _upcast(base[name]).abs()
        unchanged += int((d.abs() <= tol).sum().item())
        total += d.numel()
    if total == 0:
        raise ValueError("update_sparsity needs at least one parameter entry, got empty parameter dicts")
    return unchanged / total


def update_rank(base: ParamDict, tuned: ParamDict, rtol: float | None = None) -> float:
    """Mean over weight matrices of the relative numerical rank of the update, rank(dW) / min(dW.shape).

    rank(dW) = #{singular values s_i > rtol * s_max}. The default rtol=None uses max(m, n) * eps of the
    compute dtype, the numpy/torch ``matrix_rank`` convention (rank up to round-off); pass e.g. rtol=1e-3
    for an "effective" rank that ignores small directions. dW = 0 has rank 0. Matrices are selected and
    matricized as in ``update_spectral_norm`` (1-D parameters skipped).

    Args:
        base, tuned: {name: Tensor[*shape_name]}, same keys and shapes; at least one with ndim >= 2.
        rtol: relative singular-value threshold, >= 0, or None for the default above.
    Returns:
        float in [0, 1].
    """
    return update_spectrum(base, tuned, rtol)["update_rank"]


def update_spectrum(base: ParamDict, tuned: ParamDict, rtol: float | None = None) -> dict[str, float]:
    """``update_spectral_norm`` and ``update_rank`` from ONE singular-value decomposition per matrix.

    The SVDs dominate the cost of evaluating a checkpoint, so callers that want both ask here.
    Returns {"update_spectral_norm": float, "update_rank": float}.
    """
    if rtol is not None and rtol < 0:
        raise ValueError(f"rtol must be >= 0 or None, got {rtol}")
    spectral, ratios = 0.0, []
    for d in _deltas(base, tuned).values():
        m = _as_matrix(d)
        if m is None or m.numel() == 0:
            continue
        s = torch.linalg.svdvals(m)  # [min(m, n)], descending
        s_max = s[0]
        spectral += s_max.item()
        if s_max <= 0:
            ratios.append(0.0)
            continue
        tol = rtol if rtol is not None else max(m.shape) * torch.finfo(m.dtype).eps
        ratios.append((s > tol * s_max).sum().item() / min(m.shape))
    if not ratios:
        raise ValueError(
            f"update_rank needs at least one parameter with ndim >= 2; got only {sorted(base)} "
            "(all scalars or vectors)"
        )
    return {"update_spectral_norm": float(spectral), "update_rank": float(sum(ratios) / len(ratios))}


# ----------------------------------------------------------------------------------------------------------
# activations and representations
# ----------------------------------------------------------------------------------------------------------
def activation_change(base_acts: torch.Tensor, tuned_acts: torch.Tensor, p: int = 2) -> float:
    """Mean over inputs of the Lp norm of the hidden-activation change, (1/N) sum_n ||a_n - b_n||_p.

    Args:
        base_acts, tuned_acts: [N, D] activations of the same N inputs (concatenate layers along D first).
        p: 1 or 2.
    Returns:
        float, >= 0.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    if base_acts.shape != tuned_acts.shape or base_acts.ndim != 2:
        raise ValueError(
            f"expected base_acts and tuned_acts both [N, D] with equal shapes, got "
            f"{tuple(base_acts.shape)} and {tuple(tuned_acts.shape)}"
        )
    diff = _upcast(tuned_acts) - _upcast(base_acts)  # [N, D]
    return float(torch.linalg.vector_norm(diff, ord=p, dim=1).mean().item())


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> H (x x^T) H with H = I - 11^T/N; equals the Gram matrix of the column-centred features."""
    xc = x - x.mean(dim=0, keepdim=True)
    return xc @ xc.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear Centered Kernel Alignment (Kornblith et al. 2019, "Similarity of Neural Network
    Representations Revisited", eq. 3 with biased HSIC):

        CKA = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),   Kc = H x x^T H,  Lc = H y y^T H.

    1 for identical representations; invariant to orthogonal transforms and isotropic scaling of either
    argument (and to adding a constant vector, thanks to the centring).

    Args:
        x: [N, D1], y: [N, D2], rows are the same N inputs.
    Returns:
        float in [0, 1]; NaN if either representation is constant over the N inputs (CKA undefined).
    """
    _check_2d_pair(x, y, "x", "y")
    k = _centred_gram(x.detach().to(torch.float64))  # [N, N]
    l = _centred_gram(y.detach().to(torch.float64))  # [N, N]
    denom = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    if denom == 0:
        return float("nan")
    return float(((k * l).sum() / denom).item())


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of Song et al. 2012 ("Feature Selection via Dependence Maximization", JMLR,
    eq. 5), with Kt, Lt = k, l with zeroed diagonals:

        HSIC_1 = [ tr(Kt Lt) + 1^T Kt 1 * 1^T Lt 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T Kt Lt 1 ] / (n(n-3))

    Written for possibly non-symmetric (kNN-masked) kernels as in CKNNA: tr(Kt Lt) = sum_ij Kt_ij Lt_ji.

    Args:
        k, l: [n, n] kernel matrices, n >= 4.
    Returns:
        0-d float tensor.
    """
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"expected two [n, n] kernels of equal shape, got {tuple(k.shape)} and {tuple(l.shape)}")
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs n >= 4 samples (divides by n-3), got n={n}")
    off = 1.0 - torch.eye(n, dtype=k.dtype, device=k.device)
    kt, lt = k * off, l * off
    trace_term = (kt * lt.T).sum()
    sum_term = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 * (kt @ lt).sum() / (n - 2)
    return (trace_term + sum_term - cross_term) / (n * (n - 3))


def _knn_mask(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """[N, N] kernel -> [N, N] 0/1 mask with row i marking the k most similar j != i (largest kernel value).

    Ties are broken by torch.topk (deterministic on CPU); the relation is directed (j in kNN(i) does not
    imply i in kNN(j)), so the mask need not be symmetric.
    """
    n = kernel.shape[0]
    scores = kernel.clone()
    scores.fill_diagonal_(float("-inf"))  # a sample is never its own neighbour
    idx = torch.topk(scores, k, dim=1).indices  # [N, k]
    return torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device).scatter_(1, idx, 1.0)


def cknna(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Centered Kernel Nearest-Neighbor Alignment (Huh et al. 2024, "The Platonic Representation
    Hypothesis", ICML, Appendix A), with linear kernels K = x x^T, L = y y^T.

    CKA restricted to pairs (i, j) that are mutual k-nearest neighbours in both spaces:

        alpha_KL(i, j) = 1[i != j, j in kNN_K(i), j in kNN_L(i)]       (neighbours = largest kernel value)
        CKNNA = HSIC_1(alpha_KL * K, alpha_KL * L)
                / sqrt(HSIC_1(alpha_KK * K, alpha_KK * K) * HSIC_1(alpha_LL * L, alpha_LL * L))

    Definition choices follow the authors' reference implementation (minyoungg/platonic-rep, metrics.py,
    default ``unbiased=True``), so values are comparable with published numbers:

    * neighbours are ranked on the RAW (uncentred) linear kernel, excluding self;
    * the mask multiplies the raw kernels BEFORE centring; centring is the one implicit in the unbiased HSIC
      estimator (``hsic_unbiased``, Song et al. 2012);
    * each self-alignment in the denominator uses its own kernel's kNN mask (alpha_KK = kNN_K), as in the
      paper's Align_kNN(K, K), so the value is not bounded by 1 in general, but equals 1 for x == y.

    With k = N - 1 every off-diagonal pair is kept and CKNNA equals unbiased linear CKA.

    Args:
        x: [N, D1], y: [N, D2], rows are the same N inputs; N >= 4.
        k: neighbours per sample, 2 <= k <= N - 1.
    Returns:
        float; NaN if a self-alignment is <= 0 (e.g. constant representations).
    """
    _check_2d_pair(x, y, "x", "y")
    n = x.shape[0]
    if not 2 <= k <= n - 1:
        raise ValueError(f"k must satisfy 2 <= k <= N - 1 = {n - 1}, got k={k}")
    kx = x.detach().to(torch.float64) @ x.detach().to(torch.float64).T  # [N, N]
    ly = y.detach().to(torch.float64) @ y.detach().to(torch.float64).T  # [N, N]
    mask_k, mask_l = _knn_mask(kx, k), _knn_mask(ly, k)
    mask_kl = mask_k * mask_l  # mutual neighbours; diagonal is already 0
    num = hsic_unbiased(mask_kl * kx, mask_kl * ly)
    self_k = hsic_unbiased(mask_k * kx, mask_k * kx)
    self_l = hsic_unbiased(mask_l * ly, mask_l * ly)
    if self_k <= 0 or self_l <= 0:
        return float("nan")
    return float((num / (self_k * self_l).sqrt()).item())

"""Memory-lean cross-entropy over many early exits that share one LM head.

CALM-style joint training minimises ``sum_i alpha_i * CE(W f(h_i) + b, y)`` over all L exits. Done
naively, autograd keeps every exit's (N, V) logits (and their softmax) alive until backward, i.e.
``L * N * V`` floats -- tens of GiB for a 128k vocabulary. :func:`multi_exit_cross_entropy` instead
computes each row-chunk's logits, loss *and* gradients in the forward pass and keeps only the gradients
(the size of the features, plus one (V, d) and one (V,) buffer) for backward.

Implementations (``impl``):

* ``"chunked"`` -- pure PyTorch, runs everywhere (CPU/CUDA); the default fallback.
* ``"naive"``   -- materialises each exit's logits and calls :func:`torch.nn.functional.cross_entropy`;
  the numerical reference for tests and benchmarks.
* ``"liger"``   -- Liger-Kernel's fused linear cross-entropy, once per exit (CUDA only).
* ``"cce"``     -- Apple's Cut Cross-Entropy, once per exit (CUDA only, no label smoothing).
* ``"auto"``    -- ``liger`` or ``cce`` on CUDA when importable (and applicable), else ``chunked``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IMPLS", "multi_exit_cross_entropy"]

IMPLS = ("auto", "chunked", "naive", "liger", "cce")

# Elements of float32 logits one chunk may hold (256 MiB). Big enough that the (rows, d) x (d, V)
# matmul saturates a GPU, small enough that a 128k vocabulary still only takes ~500 rows at a time.
_AUTO_CHUNK_ELEMENTS = 1 << 26


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------


def _as_feature_list(features: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(features, Tensor):
        if features.dim() != 3:
            raise ValueError(
                f"features given as one tensor must have shape (L, N, d); got {tuple(features.shape)}"
            )
        # unbind keeps autograd intact: the per-exit grads are stacked back by unbind's backward.
        return list(features.unbind(0))
    feats = list(features)
    if not feats:
        raise ValueError("features must contain at least one exit")
    if not all(isinstance(f, Tensor) for f in feats):
        raise ValueError("features must be a tensor or a sequence of tensors")
    return feats


def _as_alpha_list(layer_weights: Tensor | Sequence[float], n_exits: int) -> list[float]:
    if isinstance(layer_weights, Tensor):
        if layer_weights.dim() != 1:
            raise ValueError(f"layer_weights must be 1-D (L,); got shape {tuple(layer_weights.shape)}")
        alphas = [float(a) for a in layer_weights.detach().cpu().tolist()]
    else:
        alphas = [float(a) for a in layer_weights]
    if len(alphas) != n_exits:
        raise ValueError(f"got {n_exits} feature tensors but {len(alphas)} layer_weights; they must match")
    bad = [a for a in alphas if not math.isfinite(a) or a < 0]
    if bad:
        raise ValueError(f"layer_weights must be finite and non-negative; got {alphas}")
    return alphas


def _validate(
    feats: list[Tensor],
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    label_smoothing: float,
    chunk_size: int | None,
    impl: str,
) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(repr(i) for i in IMPLS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows or None; got {chunk_size}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, d); got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},); got {tuple(bias.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (N,); got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    n_rows = labels.shape[0]
    for i, f in enumerate(feats):
        if not f.dtype.is_floating_point:
            raise ValueError(f"features[{i}] must be floating point; got {f.dtype}")
        if f.dim() != 2:
            raise ValueError(f"features[{i}] must have shape (N, d); got {tuple(f.shape)}")
        if f.shape[1] != dim:
            raise ValueError(
                f"features[{i}] has feature dim {f.shape[1]} but weight has shape (V, d) = {tuple(weight.shape)}"
            )
        if f.shape[0] != n_rows:
            raise ValueError(
                f"labels have shape ({n_rows},) but features[{i}] has {f.shape[0]} rows; they must match"
            )


def _auto_chunk_rows(vocab: int) -> int:
    rows = _AUTO_CHUNK_ELEMENTS // max(vocab, 1)
    # Multiples of 8 keep the chunk matmuls tensor-core friendly.
    return max(8, rows // 8 * 8)


def _no_autocast(device: torch.device):
    # Under Lightning's bf16-mixed the matmuls below would silently run in bf16; the whole point
    # is fp32 logits, so autocast is switched off for the loss.
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Chunked implementation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cfg:
    alphas: tuple[float, ...]
    ignore_index: int
    label_smoothing: float
    chunk_rows: int
    n_valid: int


def _chunked_core(
    feats: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    cfg: _Cfg,
    feat_grad: Sequence[bool],
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, list[Tensor | None], Tensor | None, Tensor | None]:
    """Loss and (optionally) gradients, one row-chunk of one exit at a time.

    Returns ``(loss (), per_layer (L,), grad_feats [(N, d) | None], grad_weight (V, d) fp32 | None,
    grad_bias (V,) fp32 | None)``. Gradients are of ``loss`` itself, i.e. already carry
    ``alpha_i / n_valid``.
    """
    device = weight.device
    vocab, dim = weight.shape
    n_rows = labels.shape[0]
    eps = cfg.label_smoothing

    per_layer = torch.full((len(feats),), float("nan"), device=device, dtype=torch.float32)
    loss = torch.zeros((), device=device, dtype=torch.float32)
    grad_feats: list[Tensor | None] = [None] * len(feats)
    grad_w = torch.zeros(vocab, dim, device=device, dtype=torch.float32) if weight_grad else None
    grad_b = (
        torch.zeros(vocab, device=device, dtype=torch.float32) if bias is not None and bias_grad else None
    )

    if cfg.n_valid == 0:
        # Mean over zero tokens: define the loss as 0 (F.cross_entropy would give NaN).
        for i, a in enumerate(cfg.alphas):
            if a > 0:
                per_layer[i] = 0.0
        return loss, per_layer, grad_feats, grad_w, grad_b

    # One fp32 copy of the head for the whole call (a no-op for fp32 weights) rather than per chunk.
    w32 = weight.detach().float()
    b32 = bias.detach().float() if bias is not None else None
    labels = labels.to(device)
    valid_all = labels != cfg.ignore_index
    safe_all = torch.where(valid_all, labels, torch.zeros_like(labels)).unsqueeze(1)

    for i, (feat, alpha) in enumerate(zip(feats, cfg.alphas, strict=True)):
        if alpha == 0.0:
            continue  # no loss term, so no logits worth computing
        scale = alpha / cfg.n_valid
        want_gx = feat_grad[i]
        any_grad = want_gx or grad_w is not None or grad_b is not None
        gx_buf = torch.empty(n_rows, dim, device=device, dtype=feat.dtype) if want_gx else None
        ce_sum = torch.zeros((), device=device, dtype=torch.float32)
        feat = feat.detach()

        for start in range(0, n_rows, cfg.chunk_rows):
            stop = min(start + cfg.chunk_rows, n_rows)
            x = feat[start:stop].float()
            valid = valid_all[start:stop]
            tgt_idx = safe_all[start:stop]

            logits = torch.addmm(b32, x, w32.t()) if b32 is not None else x @ w32.t()
            # Everything that needs raw logits is read out first, so the single (rows, V) buffer can
            # then be turned into the softmax in place -- no second chunk-sized temporary.
            tgt_logit = logits.gather(1, tgt_idx).squeeze(1)
            mean_logit = logits.mean(dim=1) if eps > 0 else None
            row_max = logits.amax(dim=1, keepdim=True)
            logits.sub_(row_max).exp_()
            denom = logits.sum(dim=1, keepdim=True)
            lse = (row_max + denom.log()).squeeze(1)

            row_loss = lse - tgt_logit
            if mean_logit is not None:
                # torch's smoothing: (1 - eps) * NLL + eps * mean_c(-log p_c), with -log p_c = lse - z_c
                row_loss = (1.0 - eps) * row_loss + eps * (lse - mean_logit)
            ce_sum += torch.where(valid, row_loss, torch.zeros_like(row_loss)).sum()

            if not any_grad:
                continue
            # dL/dz = scale * (softmax - (1 - eps) * onehot(y) - eps / V), zero on ignored rows.
            probs = logits.div_(denom)
            if eps > 0:
                probs.sub_(eps / vocab)
            probs.scatter_add_(1, tgt_idx, torch.full_like(tgt_logit, -(1.0 - eps)).unsqueeze(1))
            probs.mul_((valid.to(probs.dtype) * scale).unsqueeze(1))

            if gx_buf is not None:
                if gx_buf.dtype == torch.float32:
                    torch.mm(probs, w32, out=gx_buf[start:stop])
                else:
                    gx_buf[start:stop].copy_(probs @ w32)
            if grad_w is not None:
                grad_w.addmm_(probs.t(), x)
            if grad_b is not None:
                grad_b.add_(probs.sum(dim=0))
            del logits, probs

        ce = ce_sum / cfg.n_valid
        per_layer[i] = ce
        loss = loss + alpha * ce
        grad_feats[i] = gx_buf

    return loss, per_layer, grad_feats, grad_w, grad_b


class _MultiExitCE(torch.autograd.Function):
    """Forward computes loss and gradients; backward only rescales the saved gradients."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor | None, labels: Tensor, cfg: _Cfg, *feats: Tensor):
        feat_grad = ctx.needs_input_grad[4:]
        weight_grad = ctx.needs_input_grad[0]
        bias_grad = bias is not None and ctx.needs_input_grad[1]
        with _no_autocast(weight.device):
            loss, per_layer, grad_feats, grad_w, grad_b = _chunked_core(
                feats, weight, bias, labels, cfg, feat_grad, weight_grad, bias_grad
            )

        # Keep grads in the parameters' dtypes: that is what backward returns anyway, and it halves
        # the saved memory for bf16 heads.
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)

        # Save only the tensors that exist; remember which slot each went to. save_for_backward (not
        # ctx attributes) so saved-tensor hooks (offloading, memory accounting) see them.
        saved = [grad_w, grad_b, *grad_feats]
        ctx.slots = [t is not None for t in saved]
        ctx.save_for_backward(*(t for t in saved if t is not None))
        ctx.feat_meta = [(f.shape, f.dtype, f.device) for f in feats]
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype, bias.device)
        ctx.mark_non_differentiable(per_layer)
        return loss, per_layer

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_per_layer: Tensor | None):
        it = iter(ctx.saved_tensors)
        saved = [next(it) if present else None for present in ctx.slots]
        grad_w, grad_b, *grad_feats = saved

        def finish(g: Tensor | None, needed: bool, meta) -> Tensor | None:
            if not needed:
                return None
            shape, dtype, device = meta
            if g is None:
                # Exit with alpha 0 or batch without valid tokens: an explicit zero (not None) so
                # e.g. DDP still sees a gradient for every parameter upstream.
                return torch.zeros(shape, dtype=dtype, device=device)
            return g.mul(grad_loss).to(dtype)

        out_w = finish(grad_w, ctx.needs_input_grad[0], ctx.weight_meta)
        out_b = finish(grad_b, ctx.bias_meta is not None and ctx.needs_input_grad[1], ctx.bias_meta)
        out_feats = [
            finish(g, need, meta)
            for g, need, meta in zip(grad_feats, ctx.needs_input_grad[4:], ctx.feat_meta, strict=True)
        ]
        return out_w, out_b, None, None, *out_feats


def _chunked(feats, weight, bias, labels, cfg: _Cfg) -> tuple[Tensor, Tensor]:
    tracked = [weight, *feats] + ([bias] if bias is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _MultiExitCE.apply(weight, bias, labels, cfg, *feats)
    # Eval / no_grad: loss only, no gradient buffers at all.
    with _no_autocast(weight.device):
        loss, per_layer, *_ = _chunked_core(
            feats, weight, bias, labels, cfg, [False] * len(feats), False, False
        )
    return loss, per_layer


# --------------------------------------------------------------------------------------------------
# Reference and third-party implementations
# --------------------------------------------------------------------------------------------------


def _zero_with_graph(tensors: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """A 0.0 scalar that still depends on the trainable inputs, so ``backward()`` works and yields zeros."""
    zero = torch.zeros((), device=device, dtype=torch.float32)
    for t in tensors:
        if t is not None and t.requires_grad:
            zero = zero + t.sum().float() * 0.0
    return zero


def _naive(feats, weight, bias, labels, cfg: _Cfg) -> tuple[Tensor, Tensor]:
    device = weight.device
    per_layer = torch.full((len(feats),), float("nan"), device=device, dtype=torch.float32)
    terms = []
    with _no_autocast(device):
        w32 = weight.float()
        b32 = bias.float() if bias is not None else None
        for i, (feat, alpha) in enumerate(zip(feats, cfg.alphas, strict=True)):
            if alpha == 0.0:
                continue
            logits = F.linear(feat.float(), w32, b32)
            if cfg.n_valid == 0:
                # "sum" over no tokens is an exact, NaN-free 0 that keeps the graph connected.
                ce = F.cross_entropy(
                    logits,
                    labels,
                    ignore_index=cfg.ignore_index,
                    label_smoothing=cfg.label_smoothing,
                    reduction="sum",
                )
            else:
                ce = F.cross_entropy(
                    logits, labels, ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing
                )
            per_layer[i] = ce.detach()
            terms.append(alpha * ce)
    # exits of weight 0 still get (zero) gradients, as with "chunked" (DDP expects one for every input)
    loss = _zero_with_graph([weight, bias, *feats], device)
    if terms:
        loss = loss + torch.stack(terms).sum()
    return loss, per_layer


def _load_liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _load_cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return linear_cross_entropy


def _per_exit_external(impl: str, fn, feats, weight, bias, labels, cfg: _Cfg) -> tuple[Tensor, Tensor]:
    """Weighted sum of per-exit mean losses from a fused single-head kernel (Liger or CCE).

    Both kernels compute ``mean CE(x @ W.T + b, y)`` over non-ignored rows with fp32 softmax, and want
    the activations in the head's dtype.
    """
    per_layer = torch.full((len(feats),), float("nan"), device=weight.device, dtype=torch.float32)
    terms = []
    for i, (feat, alpha) in enumerate(zip(feats, cfg.alphas, strict=True)):
        if alpha == 0.0:
            continue
        x = feat.to(weight.dtype).contiguous()
        if impl == "liger":
            # Keyword call: the positional order changed across Liger releases (ce_weight was
            # inserted after bias), the names did not.
            ce = fn(
                input=x,
                weight=weight,
                target=labels,
                bias=bias,
                ignore_index=cfg.ignore_index,
                label_smoothing=cfg.label_smoothing,
                reduction="mean",
            )
        else:
            # CCE has no label smoothing (callers route that to "chunked"); bias is only passed when
            # present because older releases had no bias argument.
            kwargs = {"bias": bias} if bias is not None else {}
            ce = fn(x, weight, labels, ignore_index=cfg.ignore_index, reduction="mean", **kwargs)
        ce = ce.float()
        per_layer[i] = ce.detach()
        terms.append(alpha * ce)
    return torch.stack(terms).sum(), per_layer


def _resolve_impl(impl: str, feats: list[Tensor], weight: Tensor, label_smoothing: float):
    """Pick the implementation; returns ``(name, external_fn_or_None)``."""
    on_cuda = weight.is_cuda and all(f.is_cuda for f in feats)
    if impl == "auto":
        if on_cuda:
            fn = _load_liger()
            if fn is not None:
                return "liger", fn
            fn = _load_cce() if label_smoothing == 0.0 else None
            if fn is not None:
                return "cce", fn
        return "chunked", None
    if impl in ("liger", "cce"):
        if not on_cuda:
            raise RuntimeError(f"impl={impl!r} needs CUDA tensors; use impl='chunked' (or 'auto') on CPU")
        if impl == "cce" and label_smoothing != 0.0:
            raise ValueError("impl='cce' does not support label_smoothing; use 'liger' or 'chunked'")
        fn = _load_liger() if impl == "liger" else _load_cce()
        if fn is None:
            package = "liger-kernel" if impl == "liger" else "cut-cross-entropy"
            raise RuntimeError(f"impl={impl!r} requested but {package} is not installed")
        return impl, fn
    return impl, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def multi_exit_cross_entropy(
    features: Sequence[Tensor] | Tensor,
    weight: Tensor,
    labels: Tensor,
    layer_weights: Tensor | Sequence[float],
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Weighted sum of the cross-entropies of L early exits that share one linear head.

    Computes ``loss = sum_i alpha_i * CE_i`` with ``CE_i = mean over non-ignored rows of
    F.cross_entropy(features[i] @ weight.T + bias, labels, label_smoothing=...)``, logits in float32.

    Args:
        features: L tensors of shape (N, d), or one tensor of shape (L, N, d): the exits' head inputs
            (already normalised / rescaled by the caller, with ordinary autograd). Any float dtype;
            each may or may not require grad.
        weight: (V, d) shared head weight. May be frozen (``requires_grad=False``).
        labels: (N,) integer targets; ``ignore_index`` marks rows that do not count.
        layer_weights: (L,) non-negative ``alpha_i`` (tensor or sequence). Treated as constants:
            they receive no gradient. An exit with ``alpha_i == 0`` is skipped entirely.
        bias: optional (V,) head bias.
        ignore_index: label value to ignore.
        label_smoothing: in [0, 1), same semantics as :func:`torch.nn.functional.cross_entropy`.
        chunk_size: rows per chunk for ``"chunked"``; ``None`` picks ``~2**26 / V`` rows (256 MiB of
            fp32 logits per chunk).
        impl: one of ``"auto"``, ``"chunked"``, ``"naive"``, ``"liger"``, ``"cce"`` (see module doc).

    Returns:
        ``(loss, per_layer_ce)``: ``loss`` is a float32 scalar; ``per_layer_ce`` is a detached (L,)
        float32 tensor of the unweighted ``CE_i``, NaN for exits with ``alpha_i == 0`` (not computed).
        If no label is valid, every computed ``CE_i`` and the loss are 0 and all gradients are zero.

    Gradients of ``features`` / ``weight`` / ``bias`` come back in their own dtypes. With
    ``"chunked"``, nothing of size (N, V) is kept for backward: only (N, d) per exit, (V, d) and (V,).
    """
    feats = _as_feature_list(features)
    _validate(feats, weight, labels, bias, label_smoothing, chunk_size, impl)
    labels = labels.long()  # any integer dtype: gather and F.cross_entropy take int64 only
    alphas = _as_alpha_list(layer_weights, len(feats))

    # One host sync for the whole call; every implementation needs the count (mean / empty batch).
    n_valid = int((labels != ignore_index).sum().item())
    cfg = _Cfg(
        alphas=tuple(alphas),
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        chunk_rows=chunk_size if chunk_size is not None else _auto_chunk_rows(weight.shape[0]),
        n_valid=n_valid,
    )

    name, fn = _resolve_impl(impl, feats, weight, label_smoothing)
    if name == "naive":
        return _naive(feats, weight, bias, labels, cfg)
    if name in ("liger", "cce") and n_valid > 0 and any(a > 0 for a in alphas):
        return _per_exit_external(name, fn, feats, weight, bias, labels, cfg)
    # Degenerate batches go to "chunked" too: the fused kernels would divide by zero valid tokens.
    return _chunked(feats, weight, bias, labels, cfg)

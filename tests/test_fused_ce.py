"""multi_exit_cross_entropy: the chunked autograd Function must match the naive reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eetrain.losses.fused_ce import multi_exit_cross_entropy

L, N, D, V = 3, 37, 16, 50

SCHEMES = {
    "calm": [i / sum(range(1, L + 1)) for i in range(1, L + 1)],  # alpha_i = i / sum_j j
    "uniform": [1.0 / L] * L,
    "geometric": [0.5**i for i in range(L - 1, -1, -1)],
    "explicit_with_zero": [0.3, 0.0, 1.2],
}


def make_inputs(*, bias=True, dtype=torch.float32, pad_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(N, D, generator=g).to(dtype) for _ in range(L)]
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if pad_every:
        labels[::pad_every] = -100
    return feats, weight, b, labels


def run(impl, feats, weight, bias, labels, alphas, *, grad_scale=1.0, weight_grad=True, **kw):
    """Forward + backward on fresh leaf copies; returns (loss, per_layer, grads dict)."""
    feats = [f.detach().clone().requires_grad_(True) for f in feats]
    weight = weight.detach().clone().requires_grad_(weight_grad)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    loss, per_layer = multi_exit_cross_entropy(feats, weight, labels, alphas, bias=bias, impl=impl, **kw)
    (loss * grad_scale).backward()
    zeros = torch.zeros_like  # None (unused input) and an explicit zero gradient are equivalent
    grads = {f"feat{i}": f.grad if f.grad is not None else zeros(f) for i, f in enumerate(feats)}
    grads["weight"] = weight.grad
    if bias is not None:
        grads["bias"] = bias.grad
    return loss.detach(), per_layer, grads


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    loss_a, pl_a, g_a = a
    loss_b, pl_b, g_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(pl_a, pl_b, rtol=rtol, atol=atol, equal_nan=True)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        if g_a[k] is None or g_b[k] is None:
            assert g_a[k] is None and g_b[k] is None, k
            continue
        assert g_a[k].dtype == g_b[k].dtype, k
        torch.testing.assert_close(g_a[k], g_b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [7, 36, 4096, None])  # 7, 36 do not divide N=37; 4096 > N
def test_chunked_matches_naive(scheme, bias, smoothing, chunk):
    feats, weight, b, labels = make_inputs(bias=bias)
    alphas = SCHEMES[scheme]
    kw = dict(label_smoothing=smoothing, chunk_size=chunk)
    ref = run("naive", feats, weight, b, labels, alphas, **kw)
    out = run("chunked", feats, weight, b, labels, alphas, **kw)
    assert_same(out, ref)
    assert torch.isfinite(out[0])


def test_naive_reference_is_plain_cross_entropy():
    feats, weight, b, labels = make_inputs()
    alphas = torch.tensor(SCHEMES["calm"])
    loss, per_layer = multi_exit_cross_entropy(
        feats, weight, labels, alphas, bias=b, label_smoothing=0.1, impl="naive"
    )
    expected = [F.cross_entropy(f @ weight.T + b, labels, label_smoothing=0.1) for f in feats]
    torch.testing.assert_close(per_layer, torch.stack(expected))
    torch.testing.assert_close(loss, sum(a * e for a, e in zip(alphas, expected, strict=True)))


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_zero_alpha_exit_is_skipped(impl):
    feats, weight, b, labels = make_inputs()
    loss, per_layer, grads = run(impl, feats, weight, b, labels, [0.0, 1.0, 0.0])
    assert torch.isnan(per_layer[0]) and torch.isnan(per_layer[2])
    assert torch.equal(grads["feat0"], torch.zeros(N, D))
    assert torch.equal(grads["feat2"], torch.zeros(N, D))
    torch.testing.assert_close(loss, per_layer[1])


def test_stacked_feature_tensor():
    feats, weight, b, labels = make_inputs()
    alphas = SCHEMES["geometric"]
    ref = run("naive", feats, weight, b, labels, alphas)
    stacked = torch.stack(feats).requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, per_layer = multi_exit_cross_entropy(
        stacked, w, labels, alphas, bias=b, chunk_size=10, impl="chunked"
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(per_layer, ref[1])
    for i in range(L):
        torch.testing.assert_close(stacked.grad[i], ref[2][f"feat{i}"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, ref[2]["weight"], rtol=1e-4, atol=1e-5)


def test_grad_output_not_one():
    feats, weight, b, labels = make_inputs()
    alphas = SCHEMES["calm"]
    ref = run("naive", feats, weight, b, labels, alphas, grad_scale=3.0, label_smoothing=0.1)
    out = run("chunked", feats, weight, b, labels, alphas, grad_scale=3.0, label_smoothing=0.1, chunk_size=8)
    assert_same(out, ref)
    once = run("chunked", feats, weight, b, labels, alphas, label_smoothing=0.1, chunk_size=8)
    torch.testing.assert_close(out[2]["weight"], 3 * once[2]["weight"])


def test_all_labels_ignored():
    feats, weight, b, labels = make_inputs()
    labels = torch.full_like(labels, -100)
    for impl in ("naive", "chunked"):
        loss, per_layer, grads = run(impl, feats, weight, b, labels, SCHEMES["uniform"], label_smoothing=0.1)
        assert loss.item() == 0.0
        assert torch.equal(per_layer, torch.zeros(L))
        for k, g in grads.items():
            assert torch.isfinite(g).all() and not g.any(), (impl, k)


def test_custom_ignore_index():
    feats, weight, b, labels = make_inputs(pad_every=0)
    labels[::3] = 7  # a real class id used as padding marker
    kw = dict(ignore_index=7, chunk_size=5)
    assert_same(
        run("chunked", feats, weight, b, labels, SCHEMES["calm"], **kw),
        run("naive", feats, weight, b, labels, SCHEMES["calm"], **kw),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    feats, weight, b, labels = make_inputs(dtype=dtype)
    alphas = SCHEMES["calm"]
    ref = run("naive", feats, weight, b, labels, alphas, label_smoothing=0.1)
    out = run("chunked", feats, weight, b, labels, alphas, label_smoothing=0.1, chunk_size=9)
    assert out[0].dtype == torch.float32
    for k, g in out[2].items():
        assert g.dtype == dtype, k
    # Both compute in fp32 from the same half inputs; they differ only in the final rounding of grads.
    assert_same(out, ref, rtol=2e-2, atol=2e-3)


def test_frozen_weight():
    feats, weight, b, labels = make_inputs()
    alphas = SCHEMES["calm"]
    ref = run("naive", feats, weight, b, labels, alphas, weight_grad=False)
    out = run("chunked", feats, weight, b, labels, alphas, weight_grad=False, chunk_size=11)
    assert out[2]["weight"] is None
    assert_same(out, ref)


def test_features_without_grad_train_only_head():
    feats, weight, b, labels = make_inputs()
    w_ref, w_out = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    for impl, w in (("naive", w_ref), ("chunked", w_out)):
        loss, _ = multi_exit_cross_entropy(feats, w, labels, SCHEMES["calm"], impl=impl, chunk_size=6)
        loss.backward()
    torch.testing.assert_close(w_out.grad, w_ref.grad, rtol=1e-4, atol=1e-5)


def test_gradient_flows_through_upstream_computation():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(L, N, D, generator=g)
    ln_w = torch.randn(D, generator=g)
    weight, labels = torch.randn(V, D, generator=g), torch.randint(0, V, (N,), generator=g)
    labels[::6] = -100
    results = {}
    for impl in ("naive", "chunked"):
        h = hidden.clone().requires_grad_(True)
        gamma = ln_w.clone().requires_grad_(True)
        feats = [F.layer_norm(h[i], (D,), weight=gamma) * D**-0.5 for i in range(L)]  # T5-style rescale
        loss, _ = multi_exit_cross_entropy(feats, weight, labels, SCHEMES["calm"], impl=impl, chunk_size=10)
        loss.backward()
        results[impl] = (h.grad, gamma.grad)
    torch.testing.assert_close(results["chunked"][0], results["naive"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["chunked"][1], results["naive"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_hand_computed_tiny_case(impl):
    # V=3, d=2, N=2, two exits with alphas (1, 2); W rows are e1, e2, e1+e2; zero bias.
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    x1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)  # logits [1, 0, 1] and [0, 0, 0]
    x2 = torch.zeros(2, 2, requires_grad=True)  # all logits 0
    labels = torch.tensor([0, 2])
    loss, per_layer = multi_exit_cross_entropy(
        [x1, x2], weight, labels, [1.0, 2.0], bias=bias, impl=impl, chunk_size=1
    )
    loss.backward()

    # CE_1 = ((log(2e + 1) - 1) + log 3) / 2,  CE_2 = log 3,  loss = CE_1 + 2 * CE_2
    assert per_layer.tolist() == pytest.approx([0.9803035463631804, 1.0986122886681098], rel=1e-6)
    assert loss.item() == pytest.approx(3.1775281236993997, rel=1e-6)

    # Exit 1, row 1: p = [e, 1, e] / (2e + 1), dz = (p - onehot(0)) / 2 = [-0.28884, 0.07768, 0.21116]
    dz = [-0.2888406008742409, 0.07768120174848181, 0.2111593991257591]
    # dx = dz @ W = [dz0 + dz2, dz1 + dz2]; row 2: p = 1/3 each, label 2 -> dz = [1/6, 1/6, -1/3]
    torch.testing.assert_close(
        x1.grad, torch.tensor([[dz[0] + dz[2], dz[1] + dz[2]], [-1 / 6, -1 / 6]]), rtol=1e-6, atol=1e-7
    )
    # Exit 2 (alpha 2): dz_row1 = [-2/3, 1/3, 1/3], dz_row2 = [1/3, 1/3, -2/3]
    torch.testing.assert_close(
        x2.grad, torch.tensor([[-1 / 3, 2 / 3], [-1 / 3, -1 / 3]]), rtol=1e-6, atol=1e-7
    )
    # Only exit 1 row 1 has a non-zero input x = [1, 0]: dW = outer(dz, x)
    torch.testing.assert_close(
        weight.grad, torch.tensor([[dz[0], 0.0], [dz[1], 0.0], [dz[2], 0.0]]), rtol=1e-6, atol=1e-7
    )
    # db = sum of all four dz rows
    torch.testing.assert_close(
        bias.grad,
        torch.tensor([-0.4555072675409076, 0.9110145350818151, -0.45550726754090753]),
        rtol=1e-6,
        atol=1e-7,
    )
    assert math.isclose(sum(bias.grad.tolist()), 0.0, abs_tol=1e-6)  # softmax grads sum to zero


def test_no_grad_computes_loss_only():
    feats, weight, b, labels = make_inputs()
    feats = [f.requires_grad_(True) for f in feats]
    weight.requires_grad_(True)
    ref_loss, ref_pl = multi_exit_cross_entropy(feats, weight, labels, SCHEMES["calm"], bias=b, impl="naive")
    packed = []
    with (
        torch.no_grad(),
        torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t),
    ):
        loss, per_layer = multi_exit_cross_entropy(
            feats, weight, labels, SCHEMES["calm"], bias=b, impl="chunked", chunk_size=5
        )
    assert not loss.requires_grad and loss.grad_fn is None
    assert packed == []
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(per_layer, ref_pl)


def test_autocast_keeps_fp32_logits():
    feats, weight, b, labels = make_inputs()
    ref = run("chunked", feats, weight, b, labels, SCHEMES["calm"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run("chunked", feats, weight, b, labels, SCHEMES["calm"])
    assert_same(out, ref, rtol=1e-6, atol=1e-7)


def test_auto_on_cpu_uses_chunked():
    feats, weight, b, labels = make_inputs()
    weight.requires_grad_(True)
    loss, _ = multi_exit_cross_entropy(feats, weight, labels, SCHEMES["calm"], bias=b)
    assert "MultiExitCE" in type(loss.grad_fn).__name__
    ref, _ = multi_exit_cross_entropy(feats, weight, labels, SCHEMES["calm"], bias=b, impl="naive")
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("impl", ["liger", "cce"])
def test_gpu_kernels_refuse_cpu_tensors(impl):
    feats, weight, b, labels = make_inputs()
    with pytest.raises(RuntimeError, match="CUDA"):
        multi_exit_cross_entropy(feats, weight, labels, SCHEMES["calm"], impl=impl)


def test_saved_tensors_are_small():
    n_exits, n, d, vocab = 4, 512, 32, 5000
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, vocab, (n,), generator=g)
    logits_bytes = n_exits * n * vocab * 4

    def saved_bytes(impl):
        feats = [torch.randn(n, d, generator=g, requires_grad=True) for _ in range(n_exits)]
        weight = torch.randn(vocab, d, generator=g, requires_grad=True)
        bias = torch.zeros(vocab, requires_grad=True)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = multi_exit_cross_entropy(
                feats, weight, labels, [0.1, 0.2, 0.3, 0.4], bias=bias, impl=impl, chunk_size=128
            )
        loss.backward()
        return total

    chunked = saved_bytes("chunked")
    # Exactly the gradient buffers: L * (N, d) + (V, d) + (V,), all fp32.
    assert chunked == 4 * (n_exits * n * d + vocab * d + vocab)
    assert chunked < 0.1 * logits_bytes
    # The hook really sees what autograd keeps: the naive path holds every exit's (N, V) log-probs.
    assert saved_bytes("naive") > 0.9 * logits_bytes


def test_bad_inputs():
    feats, weight, b, labels = make_inputs()
    alphas = SCHEMES["calm"]
    call = multi_exit_cross_entropy
    with pytest.raises(ValueError, match="layer_weights"):
        call(feats, weight, labels, alphas[:2])
    with pytest.raises(ValueError, match="non-negative"):
        call(feats, weight, labels, [0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="labels"):
        call(feats, weight, labels[:-1], alphas)
    with pytest.raises(ValueError, match="labels"):
        call(feats, weight, labels.view(1, -1), alphas)
    with pytest.raises(ValueError, match="feature dim"):
        call(feats, weight[:, :-1], labels, alphas)
    with pytest.raises(ValueError, match="'auto', 'chunked', 'naive', 'liger', 'cce'"):
        call(feats, weight, labels, alphas, impl="fast")
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="label_smoothing"):
            call(feats, weight, labels, alphas, label_smoothing=bad)
    with pytest.raises(ValueError, match="bias"):
        call(feats, weight, labels, alphas, bias=torch.zeros(V + 1))
    with pytest.raises(ValueError, match="chunk_size"):
        call(feats, weight, labels, alphas, chunk_size=0)
    with pytest.raises(ValueError, match="integer"):
        call(feats, weight, labels.float(), alphas)
    with pytest.raises(ValueError, match="at least one"):
        call([], weight, labels, [])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])  # int8 holds the -100 padding
@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_any_integer_label_dtype(impl, dtype):
    feats, weight, b, labels = make_inputs()
    want = multi_exit_cross_entropy(feats, weight, labels, [0.5, 1.0, 1.0], bias=b, impl=impl)[0]
    got = multi_exit_cross_entropy(feats, weight, labels.to(dtype), [0.5, 1.0, 1.0], bias=b, impl=impl)[0]
    assert torch.equal(got, want)

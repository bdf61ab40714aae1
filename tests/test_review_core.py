"""Review of the core ops as a demanding user would call them: odd-but-legal inputs on both backends and both
gradient designs, each accepted input compared with a float64 oracle, each refused one checked for an error that
names the argument. These failed before commit 9b0fd47 (the review's defects, now regressions):
test_non_finite_upstream_at_rows_that_do_not_count (Triton), test_compile_with_dynamic_true,
test_compile_linear_with_dynamic_true, test_compiled_step_with_a_changing_python_number,
test_linear_fake_kernels_match_a_transposed_weight, test_normalizer_tensor_out_of_range_is_refused_like_a_number,
test_apa_loss_from_logprobs_ignores_garbage_where_masked, test_apa_loss_from_logprobs_errors_describe_the_shape.
"""

import math

import numpy as np
import pytest
import torch
from conftest import rel_err
from oracles import IGNORE, make_inputs, oracle

import apa_fast
from apa_fast import _dispatch

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                                    reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")),
    "torch",
]
TOL = 2e-5
# A loss value r^2 whose residual r nearly cancels is only as accurate as r (float32 log-probs, error ~1e-7 * |logp|):
# values are compared relative to at least this magnitude.
VALUE_SCALE = 0.1


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"])
def design(request, monkeypatch):
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


def _close(got, want, what, tol=TOL, scale=0.0):
    if "grad" not in what and "accumulated" not in what and "tanh" not in what:
        scale = max(scale, VALUE_SCALE)  # a value, not a gradient
    err = rel_err(got, want, scale)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------------------
# A float64 oracle for the linear ops (autograd through the textbook formula, never the kernels).
# ----------------------------------------------------------------------------------------------------
def linear_oracle(kind, hidden, weight, bias, labels, ref, adv, mask, *, lam=1.0, temperature=1.0, logit_scale=1.0,
                  logit_softcap=None, reduction="mean", weights=None):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    z = logit_scale * (h @ w.T + (0.0 if b is None else b))
    if logit_softcap:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    counted = labels.long() != IGNORE
    if mask is not None:
        counted = counted & (mask != 0)
    logp = torch.log_softmax(z / temperature, -1).gather(-1, torch.where(counted, labels.long(), 0)[..., None])[..., 0]
    logp = torch.where(counted, logp, 0.0)
    if kind == "logprobs":
        out = logp
    else:
        terms = torch.where(counted, (logp - ref.double() - adv.double() / lam) ** 2, 0.0)
        out = {"none": terms, "sum": terms.sum(), "mean": terms.sum() / counted.sum().clamp(min=1)}[reduction]
    (out if out.dim() == 0 else (out * weights.double()).sum()).backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def linear_data(rows_shape, hidden_size, vocab, *, dtypes=(torch.float32,) * 3, bias=True):
    hidden = torch.randn(*rows_shape, hidden_size).to(dtypes[0])
    weight = (torch.randn(vocab, hidden_size) * 2.0 / hidden_size**0.5).to(dtypes[1])
    bias_tensor = torch.randn(vocab).to(dtypes[2]) if bias else None
    labels = torch.randint(0, vocab, rows_shape)
    labels[torch.rand(rows_shape) < 0.2] = IGNORE
    mask = torch.rand(rows_shape) >= 0.25
    # |r| = |logp - ref - adv / lam| >= 2.4 (lam <= 1): a residual that nearly cancels would make any float32 result
    # (relative to the float64 one) as inaccurate as r is small.
    ref, adv, weights = -0.5 * torch.rand(rows_shape) - 0.1, torch.rand(rows_shape) + 3.0, torch.randn(rows_shape)
    return hidden, weight, bias_tensor, labels, ref, adv, mask, weights


def check_linear(backend, data, *, kind="apa", requires=(True, True, True), reduction="mean", tol=TOL, grad_tol=None,
                 **kwargs):
    hidden, weight, bias, labels, ref, adv, mask, weights = data
    mask = None if kind == "logprobs" else mask
    leaves = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip((hidden, weight, bias),
                                                                                          requires, strict=True)]
    h, w, b = leaves
    if kind == "logprobs":
        out = apa_fast.linear_logprobs(h, w, labels, bias=b, backend=backend, **kwargs)
    else:
        out = apa_fast.linear_loss(h, w, labels, ref, adv, mask, bias=b, reduction=reduction, backend=backend,
                                   **kwargs)
    assert out.dtype == torch.float32
    (out if out.dim() == 0 else (out * weights).sum()).backward()
    lin_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    want, grads = linear_oracle(kind, hidden, weight, bias, labels, ref, adv, mask, reduction=reduction,
                                weights=weights, **lin_kwargs)
    _close(out, want, "value", tol, VALUE_SCALE)
    for name, leaf, needed, grad in zip(("hidden", "weight", "bias"), leaves, requires, grads, strict=True):
        if leaf is None:
            continue
        if not needed:
            assert leaf.grad is None, name
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        _close(leaf.grad, grad, f"grad of {name}", grad_tol or tol)


# ----------------------------------------------------------------------------------------------------
# Logits ops: zero-size, one-token, V = 1, all-zero masks.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows_shape", [(0, 3), (2, 0), (0,)], ids=str)
def test_zero_tokens_every_reduction(backend, design, rows_shape):
    logits, labels, aux, adv, mask, _ = make_inputs(rows_shape, 11)
    for reduction in ("mean", "sum", "none"):
        x = logits.clone().requires_grad_()
        out = apa_fast.loss(x, labels, aux, adv, mask, reduction=reduction, backend=backend, inplace_backward=True)
        assert out.shape == (rows_shape if reduction == "none" else ())
        out.sum().backward()
        assert x.grad.shape == logits.shape and out.sum().item() == 0.0
    assert apa_fast.logprobs(logits, labels, backend=backend).shape == rows_shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["apa", "ppo", "awr", "logprobs"])
def test_one_token_one_dimensional_logits(backend, design, kind):
    """(V,) logits with a 0-dim label: one token, no leading dimension at all."""
    logits, aux, adv = torch.randn(9) * 3, torch.tensor(2.0), torch.tensor(0.7)  # |r| > 2
    label = logits.argmin()  # not a near-certain token: 1 - softmax would cancel in any float32 code
    want_value, want_grad = oracle(kind, logits, label, aux, adv, None)
    x = logits.clone().requires_grad_()
    fn = {"apa": lambda: apa_fast.loss(x, label, aux, adv, backend=backend),
          "ppo": lambda: apa_fast.ppo_loss(x, label, aux, adv, backend=backend),
          "awr": lambda: apa_fast.awr_loss(x, label, adv, backend=backend),
          "logprobs": lambda: apa_fast.logprobs(x, label, backend=backend)}[kind]
    out = fn()
    assert out.shape == ()
    out.backward()
    _close(out, want_value, "value", scale=VALUE_SCALE)
    _close(x.grad, want_grad, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_one(backend, design):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 1, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    out = apa_fast.loss(x, labels, aux, adv, mask, backend=backend)
    out.backward()
    want_value, want_grad = oracle("apa", logits, labels, aux, adv, mask)
    _close(out, want_value, "value", scale=VALUE_SCALE)
    assert x.grad.abs().max() <= 1e-5  # softmax of one column is 1 (up to the rounding of the saved lse)
    assert torch.equal(apa_fast.logprobs(logits, labels, backend=backend), torch.zeros(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_masks(backend, design):
    logits, labels, aux, adv, _, _ = make_inputs((2, 3), 11)
    for mask in (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.int8)):
        for reduction in ("mean", "sum"):
            x = logits.clone().requires_grad_()
            out = apa_fast.loss(x, labels, aux, adv, mask, reduction=reduction, backend=backend)
            out.backward()
            assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x.grad))


# ----------------------------------------------------------------------------------------------------
# Backward: every reduction in place with strided upstream gradients; retain_graph and in-place grad edits.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_every_reduction_and_strided_upstream(backend, design, reduction):
    logits, labels, aux, adv, mask, _ = make_inputs((3, 4), 13)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1  # a non-leaf buffer, as a model's logits (a leaf's memory is never overwritten)
    out = apa_fast.loss(x, labels, aux, adv, mask, reduction=reduction, backend=backend, inplace_backward=True)
    if reduction == "none":
        upstream = torch.randn(4, 3).T  # non-contiguous
        weights = upstream
    else:
        upstream, weights = torch.tensor(2.5), None
    out.backward(upstream)
    want_value, want_grad = oracle("apa", logits, labels, aux, adv, mask, reduction=reduction, weights=weights)
    if weights is None:
        want_grad = want_grad * 2.5
    _close(out, want_value, "value", scale=VALUE_SCALE)
    _close(leaf.grad, want_grad, "grad")
    _close(x.detach(), want_grad, "the logits buffer holds the gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_gradient_of_per_token_output(backend, design):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 5), 17)
    x = logits.clone().requires_grad_()
    out = apa_fast.loss(x, labels, aux, adv, mask, reduction="none", backend=backend)
    upstream = torch.randn(5).expand(2, 5)  # stride 0
    out.backward(upstream)
    _, want = oracle("apa", logits, labels, aux, adv, mask, reduction="none", weights=upstream.contiguous())
    _close(x.grad, want, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_backward_three_times_after_an_in_place_grad_edit(backend, design):
    """The saved gradient of training mode must not alias x.grad: an in-place edit of x.grad (clipping, zero_grad
    with set_to_none=False) between two backward passes of a retained graph must not change the next pass."""
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    x = logits.clone().requires_grad_()
    out = apa_fast.loss(x, labels, aux, adv, mask, backend=backend)
    out.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad.mul_(0.5)
    out.backward(retain_graph=True)
    out.backward()
    _close(x.grad, 2.5 * first, "accumulated")


def test_retain_graph_linear_three_times_after_an_in_place_grad_edit(design):
    data = linear_data((2, 3), 8, 13)
    hidden, weight, bias, labels, ref, adv, mask, _ = data
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = apa_fast.linear_loss(leaves[0], leaves[1], labels, ref, adv, mask, bias=leaves[2], backend="torch")
    out.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad.mul_(0.5)
    out.backward(retain_graph=True)
    out.backward()
    for leaf, grad in zip(leaves, first, strict=True):
        _close(leaf.grad, 2.5 * grad, "accumulated")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_through_a_softcap_is_right_or_loud(backend):
    """Gemma-style logits: the in-place gradient must not silently corrupt an op that saved the logits."""
    z0, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    ref, adv = torch.randn(2, 3) - 2.0, torch.randn(2, 3)
    z = z0.clone().requires_grad_()
    apa_fast.loss(5.0 * torch.tanh(z / 5.0), labels, ref, adv, backend=backend).backward()
    want = z.grad
    z = z0.clone().requires_grad_()
    apa_fast.loss(5.0 * torch.tanh(z / 5.0), labels, ref, adv, backend=backend, inplace_backward=True).backward()
    _close(z.grad, want, "tanh then scale: the last op saved no output")
    z = z0.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        apa_fast.loss(torch.tanh(z), labels, ref, adv, backend=backend, inplace_backward=True).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["loss", "logprobs"])
def test_non_finite_upstream_at_rows_that_do_not_count(backend, design, op):
    """Per-token outputs are constant 0 where a row does not count: an inf/NaN upstream weight there (1 / a zero
    token count, exp(logp - old) with old = -inf at padding) must leave that row's gradient at exact zeros."""
    logits, labels, aux, adv, mask, weights = make_inputs((2, 3), 11, ignore_frac=0.0)
    mask[0, 0] = False
    weights[0, 0] = float("inf")
    x = logits.clone().requires_grad_()
    if op == "loss":
        out = apa_fast.loss(x, labels, aux, adv, mask, reduction="none", backend=backend)
    else:
        out = apa_fast.logprobs(x, torch.where(mask, labels, IGNORE), backend=backend)
    out.backward(weights)
    _, want = oracle("apa" if op == "loss" else "logprobs", logits, torch.where(mask, labels, IGNORE), aux, adv, mask,
                     reduction="none", weights=weights)
    assert torch.equal(x.grad[0, 0], torch.zeros_like(x.grad[0, 0]))
    _close(x.grad, want, "grad")


# ----------------------------------------------------------------------------------------------------
# Grad modes, autocast, meta tensors, numpy scalars.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_inference_mode(backend, design):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    want, _ = oracle("apa", logits, labels, aux, adv, mask)
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        out = apa_fast.loss(x, labels, aux, adv, mask, backend=backend, inplace_backward=True)
    assert not out.requires_grad
    _close(out, want, "no_grad")
    with torch.inference_mode():
        out = apa_fast.loss(x, labels, aux, adv, mask, backend=backend)
        inference = apa_fast.loss(logits.clone(), labels.clone(), aux.clone(), adv.clone(), mask.clone(),
                                  backend=backend)
        per_token = apa_fast.logprobs(x, labels, backend=backend)
    assert not out.requires_grad and not per_token.requires_grad
    _close(out, want, "inference_mode")
    _close(inference, want, "inference tensors")
    hidden, weight, bias, labels, ref, adv, mask, _ = linear_data((2, 3), 8, 13)
    want, _ = linear_oracle("apa", hidden, weight, bias, labels, ref, adv, mask)
    with torch.inference_mode():
        out = apa_fast.linear_loss(hidden.requires_grad_(), weight, labels, ref, adv, mask, bias=bias, backend=backend)
    assert not out.requires_grad
    _close(out, want, "linear under inference_mode")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_around_the_logits_ops(backend, dtype):
    """Autocast does not touch the logits ops: float32 logits stay float32, the result is float32."""
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    want_value, want_grad = oracle("apa", logits, labels, aux, adv, mask)
    x = logits.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = apa_fast.loss(x, labels, aux, adv, mask, backend=backend)
        per_token = apa_fast.logprobs(x, labels, backend=backend)
    assert out.dtype == per_token.dtype == torch.float32
    out.backward()
    _close(out, want_value, "value", scale=VALUE_SCALE)
    _close(x.grad, want_grad, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_under_autocast_equals_f_linear_then_loss(backend, design, dtype):
    hidden, weight, bias, labels, ref, adv, mask, _ = linear_data((2, 3), 8, 13)
    fused = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    plain = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=dtype):
        got = apa_fast.linear_loss(fused[0], fused[1], labels, ref, adv, mask, bias=fused[2], backend=backend)
        logits = torch.nn.functional.linear(*plain)
        want = apa_fast.loss(logits, labels, ref, adv, mask, backend=backend)
    assert logits.dtype == dtype
    got.backward()
    want.backward()
    _close(got, want, "value")
    for a, b in zip(fused, plain, strict=True):
        assert a.grad.dtype == torch.float32
        # Both paths round to the autocast dtype, in different orders (the fused bias gradient sums in float32):
        # a few units of the 8-bit (bfloat16) mantissa apart at most.
        _close(a.grad, b.grad, "grad", 2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 3, 11, device="meta", requires_grad=True)
    labels, floats = torch.empty(2, 3, dtype=torch.long, device="meta"), torch.empty(2, 3, device="meta")
    out = apa_fast.loss(x, labels, floats, floats)
    assert out.device.type == "meta" and out.shape == ()
    out.backward()
    assert x.grad.shape == x.shape
    assert apa_fast.loss(x, labels, floats, floats, reduction="none").shape == (2, 3)


def test_numpy_scalars_as_hyper_parameters():
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    want, _ = oracle("apa", logits, labels, aux, adv, mask, lam=0.5, temperature=0.75, normalizer=7.0)
    got = apa_fast.loss(logits, labels, aux, adv, mask, lam=np.float32(0.5), temperature=np.float32(0.75),
                        normalizer=np.float32(7.0), ignore_index=np.int64(IGNORE))
    _close(got, want, "numpy scalars")
    hidden, weight, bias, labels, ref, adv, mask, _ = linear_data((2, 3), 8, 13)
    want, _ = linear_oracle("apa", hidden, weight, bias, labels, ref, adv, mask, logit_scale=0.5, logit_softcap=3.0)
    got = apa_fast.linear_loss(hidden, weight, labels, ref, adv, mask, bias=bias, logit_scale=np.float32(0.5),
                               logit_softcap=np.float64(3.0))
    _close(got, want, "numpy scalars (linear)")


@pytest.mark.parametrize("change, match", [
    (dict(mask=torch.tensor([[1.0, float("nan"), 0.0]] * 2)), "mask must hold only 0/1"),
    (dict(ignore_index=2**70), "ignore_index"),
    (dict(ignore_index=-100.0), "ignore_index must be an int"),
    (dict(labels=torch.full((2, 3), 13)), "labels must be in"),
    (dict(advantages=torch.randn(3)), "advantages must have the token shape"),
    (dict(ref_logprobs=torch.randn(2, 3, dtype=torch.float64).to(torch.int32)), "ref_logprobs must be a floating"),
    (dict(normalizer=torch.ones(1)), "normalizer must be a number or a 0-dim"),
])
def test_refused_inputs_name_the_argument(change, match):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    mask[0, 0] = True  # labels are range-checked where counted only: all 6 hidden (0.25**6 = 2e-4 of seeds) hid them
    kwargs = dict(labels=labels, ref_logprobs=aux, advantages=adv, mask=mask, **{k: v for k, v in change.items()
                                                                                   if k in ("ignore_index",
                                                                                            "normalizer")})
    kwargs.update({k: v for k, v in change.items() if k in ("labels", "ref_logprobs", "advantages", "mask")})
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        apa_fast.loss(logits, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_inputs_of_odd_dtypes_and_strides(backend, design):
    logits, labels, aux, adv, mask, _ = make_inputs((3, 4), 13)
    aux64 = aux.double().T.contiguous().T  # float64, column-major
    adv16 = adv.to(torch.bfloat16)
    want_value, want_grad = oracle("apa", logits, labels, aux64.float(), adv16.float(), mask, lam=0.3)
    x = logits.clone().requires_grad_()
    out = apa_fast.loss(x, labels.to(torch.int16).T.contiguous().T, aux64, adv16, mask.double().T.contiguous().T,
                        lam=0.3, backend=backend)
    out.backward()
    _close(out, want_value, "value")
    _close(x.grad, want_grad, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_all_masked_gives_zeros(backend, design):
    hidden, weight, bias, labels, ref, adv, _, _ = linear_data((2, 3), 4, 13)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = apa_fast.linear_loss(leaves[0], leaves[1], labels, ref, adv, torch.zeros(2, 3), bias=leaves[2],
                               backend=backend)
    out.backward()
    assert out.item() == 0.0
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


# ----------------------------------------------------------------------------------------------------
# Linear ops against float64: which inputs need a gradient, bias or not, chunk_size=1, softcap, dtype mixes.
# ----------------------------------------------------------------------------------------------------
LINEAR_CASES = {
    "weight-only grad": dict(requires=(False, True, False)),
    "hidden-only grad": dict(requires=(True, False, False)),
    "bias-only grad": dict(requires=(False, False, True)),
    "chunk_size=1": dict(chunk_size=1),
    "temperature and lam": dict(temperature=0.3, lam=0.1),
    "scale and softcap": dict(logit_scale=0.7, logit_softcap=2.0),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_torch_against_float64(design, case, reduction):
    check_linear("torch", linear_data((2, 3), 8, 13), reduction=reduction, **LINEAR_CASES[case])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_saturated_softcap_matches_float32_autograd(backend, design):
    """Huge logits through the soft cap: float64 is the wrong yardstick for the gradient (1 - tanh^2 from a float32
    tanh that rounds to 1 is 0), so the gradient is compared with PyTorch's own float32 autograd of the formula."""
    hidden, weight, bias, labels, ref, adv, mask, _ = linear_data((2, 3), 8, 13)
    fused = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    plain = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got = apa_fast.linear_loss(fused[0], fused[1], labels, ref, adv, mask, bias=fused[2], logit_scale=1e4,
                               logit_softcap=5.0, backend=backend)
    z = 1e4 * torch.nn.functional.linear(*plain)
    want = apa_fast.reference.apa_loss(5.0 * torch.tanh(z / 5.0), labels, ref, adv, mask)
    got.backward()
    want.backward()
    want64, _ = linear_oracle("apa", hidden, weight, bias, labels, ref, adv, mask, logit_scale=1e4, logit_softcap=5.0)
    _close(got, want64, "value")
    for a, b in zip(fused, plain, strict=True):
        assert torch.isfinite(a.grad).all()
        _close(a.grad, b.grad, "grad", 1e-2)  # ill-conditioned: the unsaturated entries sit on a steep tanh


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_minimal_shapes(backend, design):
    for rows_shape, vocab in (((0, 3), 13), ((2, 0), 13), ((), 13), ((2, 3), 1)):
        for reduction in ("mean", "none"):
            check_linear(backend, linear_data(rows_shape, 4, vocab), reduction=reduction, chunk_size=2)
    check_linear(backend, linear_data((2, 3), 4, 13, bias=False), kind="logprobs", requires=(False, True, False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_dtype_mixes(backend, design):
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for dtypes in ((bf16, fp32, bf16), (fp16, bf16, fp32), (fp32, bf16, bf16)):
        # The widest dtype (float32) projects; only the inputs are rounded, so the oracle on the same inputs is
        # as close as float32 allows, and each gradient is rounded once to its input's dtype.
        check_linear(backend, linear_data((2, 3), 8, 13, dtypes=dtypes), tol=4e-3)


def test_linear_strided_weight_expanded_hidden_int8_labels(design):
    hidden, weight, bias, labels, ref, adv, mask, _ = linear_data((1, 3), 8, 13)
    hidden = hidden.expand(4, 3, 8)
    labels, ref, adv, mask = (t.expand(4, 3) for t in (labels, ref, adv, mask))
    weights = torch.randn(3, 4).T
    h = hidden.detach().requires_grad_()
    w = weight.T.contiguous().T.requires_grad_()  # a tied (H, V) embedding's transpose
    out = apa_fast.linear_loss(h, w, labels.to(torch.int8), ref, adv, mask, bias=bias, reduction="none",
                               backend="torch")
    (out * weights).sum().backward()
    want, grads = linear_oracle("apa", hidden, weight, bias, labels, ref, adv, mask, reduction="none",
                                weights=weights)
    _close(out, want, "value")
    _close(h.grad, grads[0], "grad of the expanded hidden")
    _close(w.grad, grads[1], "grad of the strided weight")


# ----------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): automatic dynamic shapes work; dynamic=True does not (defect).
# ----------------------------------------------------------------------------------------------------
def _compiled_matches_eager(fn, dynamic, shapes, vocab=13):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for shape in shapes:
        logits, labels, aux, adv, mask, _ = make_inputs(shape, vocab)
        x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        got, want = compiled(x, labels, aux, adv, mask), fn(y, labels, aux, adv, mask)
        got.sum().backward()
        want.sum().backward()
        _close(got, want, f"compiled value {shape}")
        _close(x.grad, y.grad, f"compiled grad {shape}")


def _apa_step(x, labels, aux, adv, mask):
    return apa_fast.loss(x, labels, aux, adv[:, :1], mask, lam=0.5, backend="torch", normalizer=7.0)


def test_compile_recompiles_with_automatic_dynamic_shapes(design):
    _compiled_matches_eager(_apa_step, None, [(2, 3), (3, 5), (1, 4)])


def test_compile_with_dynamic_true(design):
    _compiled_matches_eager(_apa_step, True, [(2, 3), (3, 5)])


def test_compile_linear_with_dynamic_true():
    hidden, weight, bias, labels, ref, adv, mask, _ = linear_data((2, 3), 8, 13)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: apa_fast.linear_loss(*a, backend="torch"), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    got = compiled(hidden, weight, labels, ref, adv, mask)
    _close(got, apa_fast.linear_loss(hidden, weight, labels, ref, adv, mask, backend="torch"), "value")


def _step_with_hyper(x, labels, aux, adv, mask, normalizer, temperature):
    return apa_fast.loss(x, labels, aux, adv, mask, backend="torch", normalizer=normalizer, temperature=temperature)


@pytest.mark.parametrize("changing", ["int normalizer", "float normalizer", "temperature"])
def test_compiled_step_with_a_changing_python_number(changing):
    torch._dynamo.reset()
    compiled = torch.compile(_step_with_hyper, fullgraph=True, backend="aot_eager")
    for step in range(3):
        logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
        normalizer = {"int normalizer": 10 + step, "float normalizer": 10.0 + step}.get(changing, 10)
        temperature = 0.7 + 0.1 * step if changing == "temperature" else 1.0
        got = compiled(logits, labels, aux, adv, mask, normalizer, temperature)
        _close(got, _step_with_hyper(logits, labels, aux, adv, mask, normalizer, temperature), f"step {step}")


@pytest.mark.parametrize("op", ["linear_forward", "linear_backward"])
def test_linear_fake_kernels_match_a_transposed_weight(op):
    from apa_fast import linear
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(8, 13).T.requires_grad_()  # an (H, V) buffer used as the (V, H) head
    labels = torch.randint(0, 13, (6,), dtype=torch.int32)
    if op == "linear_forward":
        args = (hidden, weight, None, labels, torch.randn(6), torch.randn(6), torch.tensor(5.0), 1, 1.0, 1.0, 0.0,
                1.0, 0.0, "mean", 4, "torch", True, True, False)
        torch.library.opcheck(linear._linear_forward_op, args, test_utils=("test_faketensor",))
    else:
        args = (hidden.detach(), weight.detach(), None, labels, torch.randn(6), torch.randn(6), 1.0, 1.0, 0.0, 4,
                "torch", True, True, False)
        torch.library.opcheck(linear._linear_backward_op, args, test_utils=("test_faketensor",))


# ----------------------------------------------------------------------------------------------------
# normalizer as a tensor; apa_loss_from_logprobs.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.bfloat16, torch.int8])
def test_normalizer_tensor_of_any_real_dtype(dtype):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    want, _ = oracle("apa", logits, labels, aux, adv, mask, normalizer=5.0)
    _close(apa_fast.loss(logits, labels, aux, adv, mask, normalizer=torch.tensor(5, dtype=dtype)), want, str(dtype))


@pytest.mark.parametrize("value", [0.0, -5.0, float("nan")])
def test_normalizer_tensor_out_of_range_is_refused_like_a_number(value):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 13)
    with pytest.raises(ValueError, match="normalizer"):
        apa_fast.loss(logits, labels, aux, adv, mask, normalizer=value)
    with pytest.raises(ValueError, match="normalizer"):
        apa_fast.loss(logits, labels, aux, adv, torch.zeros(2, 3), normalizer=torch.tensor(value))


@pytest.mark.parametrize("where", ["logprobs", "ref_logprobs", "advantages"])
def test_apa_loss_from_logprobs_ignores_garbage_where_masked(where):
    logp, ref, adv = -torch.rand(3, 4) - 1.0, -torch.rand(3, 4) - 1.0, torch.randn(3, 4)
    mask = torch.rand(3, 4) >= 0.4
    mask[0, 0], mask[0, 1] = False, True
    values = dict(logprobs=logp, ref_logprobs=ref, advantages=adv)
    clean = {k: v.clone().requires_grad_(k == "logprobs") for k, v in values.items()}
    want = apa_fast.apa_loss_from_logprobs(clean["logprobs"], clean["ref_logprobs"], clean["advantages"], mask)
    want.backward()
    values[where] = values[where].masked_fill(~mask, float("-inf"))
    dirty = {k: v.clone().requires_grad_(k == "logprobs") for k, v in values.items()}
    got = apa_fast.apa_loss_from_logprobs(dirty["logprobs"], dirty["ref_logprobs"], dirty["advantages"], mask)
    got.backward()
    _close(got, want, "value")
    assert torch.equal(dirty["logprobs"].grad, clean["logprobs"].grad)


def test_apa_loss_from_logprobs_errors_describe_the_shape():
    logp, ref, adv, mask = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    for kwargs in (dict(advantages=adv[:1, :2]), dict(mask=mask[:, :2]), dict(ref_logprobs=ref[:, :1].T)):
        args = dict(ref_logprobs=ref, advantages=adv, mask=mask) | kwargs
        with pytest.raises(ValueError) as info:
            apa_fast.apa_loss_from_logprobs(logp, **args)
        assert "logprobs.shape[:-1]" not in str(info.value), str(info.value)


def test_apa_loss_from_logprobs_against_float64():
    logp, ref, adv = -torch.rand(3, 4).to(torch.bfloat16), -torch.rand(3, 4), torch.randn(3)
    mask = (torch.rand(3, 4) >= 0.4).to(torch.float16)
    x = logp.clone().requires_grad_()
    got = apa_fast.apa_loss_from_logprobs(x, ref, adv[:, None], mask, lam=0.3, normalizer=torch.tensor(9))
    got.backward()
    x64 = logp.double().requires_grad_()
    terms = torch.where(mask.bool(), (x64 - ref.double() - adv.double()[:, None] / 0.3) ** 2, 0.0)
    want = terms.sum() / 9
    want.backward()
    assert got.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    _close(got, want, "value")
    _close(x.grad, x64.grad, "grad", 8e-3)
    assert math.isfinite(got.item())

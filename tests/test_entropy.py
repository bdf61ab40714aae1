"""Entropy in the kernel family (issue 20) against float64: the implementations' contract (torch backend and the
Triton launchers, the latter under the interpreter with small blocks), then the public ops.

The oracle differentiates ``-sum p log p`` of ``softmax(z / T)`` with autograd (`oracles.entropy64`), never the
kernels' hand-written ``-g_H * p * (log p + H)``. Tolerances (relative L2): entropies are float32-accurate
(2e-5, every dtype: computed in float32); gradients are stored in the logits' dtype (`GRAD_TOL`, plus twice the
error of rounding the exact gradient to that dtype).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, rel_err
from oracles import IGNORE, entropy64, make_inputs, make_token_data, oracle

import apa_fast
from apa_fast import _dispatch, torch_backend
from apa_fast.kinds import APA, KINDS, LOGPROB

VALUE_TOL = 2e-5
# float32 resolves log S, S = sum exp(z / T - max) >= 1, to a rounding of 1: a cold softmax's entropy (H = log S - ...,
# near 0) is accurate to that, absolutely, in every implementation (the kernels and the torch backend alike).
LOG_TOTAL_ROUNDING = 2 * 2.0**-24
# The interpreter truncates bf16/fp16 stores where a GPU (and torch) rounds: up to one unit in the last place.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HYPER = {"lam": 0.5, "clip_eps": 0.2, "max_weight": 5.0}
needs_interpreter = pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                       reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")
IMPLEMENTATIONS = [pytest.param("triton", marks=needs_interpreter), "torch"]


@pytest.fixture
def impl(request, monkeypatch):
    """The implementation module; Triton's with blocks of 64 columns and two persistent programs, so that a few
    hundred columns span several blocks and each program takes several rows."""
    if request.param == "torch":
        return torch_backend
    from apa_fast.kernels import logprob as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(kernels, "MAX_GRAD_BLOCK_V", 64)
    monkeypatch.setattr(kernels, "grad_programs", lambda rows, *args: min(rows, 2))
    return kernels


def _params(kind):
    return dict(zip(("param0", "param1"), kind.kernel_params(**{name: HYPER[name] for name in kind.hyper}),
                    strict=True))


def _reference(rows3d, labels, inv_temperature, g_logp, g_entropy):
    """float64 (logp, entropy, dlogits (rows, V)) with dlogits the gradient of ``sum(g_logp * logp + g_entropy *
    entropy)`` over the counted rows; 0 where not counted."""
    x = rows3d.reshape(-1, rows3d.shape[-1]).double().requires_grad_()
    counted = labels >= 0
    scaled = x * inv_temperature
    logp = torch.log_softmax(scaled, -1).gather(-1, torch.where(counted, labels, 0).long()[:, None])[:, 0]
    logp, entropy = torch.where(counted, logp, 0.0), torch.where(counted, entropy64(scaled), 0.0)
    (g_logp.double() * logp + g_entropy.double() * entropy).sum().backward()
    return logp.detach(), entropy.detach(), x.grad


def _grad_tol(expected, dtype, tol_scale=1.0):
    return GRAD_TOL[dtype] * tol_scale + 2 * rel_err(expected.to(dtype), expected)


def _token_data(kind, rows):
    aux, adv = -3.0 - 2.0 * torch.rand(rows), torch.randn(rows)
    empty = torch.empty(0)
    return (aux if kind.aux else empty), (adv if kind.reads_advantages else empty)


def _check_impl(impl, rows3d, labels, kind=APA, *, inv_temperature=1.0, entropy_coef=0.3, out3d=None,
                token_data=None, tol_scale=1.0):
    """forward, backward and forward_grad with the entropy on, against `_reference`; returns the outputs.
    ``tol_scale`` widens every tolerance (ill-conditioned inputs)."""
    rows = labels.numel()
    counted = labels >= 0
    aux, adv = token_data or _token_data(kind, rows)
    params = _params(kind)
    forward = impl.forward(rows3d, labels, aux, adv, loss_kind=kind.id, inv_temperature=inv_temperature,
                           entropy=True, **params)
    assert len(forward) == 5 and all(t.dtype == torch.float32 for t in forward)
    # Upstream gradients of logp and of the entropy: random, non-zero, 0 where the row does not count (contract).
    g_logp = torch.where(counted, torch.randn(rows), 0.0)
    g_entropy = torch.where(counted, torch.randn(rows), 0.0)
    logp, entropy, grad = _reference(rows3d, labels, inv_temperature, g_logp, g_entropy)
    dtype = rows3d.dtype
    value_tol = VALUE_TOL * tol_scale
    assert_close_rel(forward[0], logp, value_tol, f"forward logp ({impl.__name__})")
    # A cold softmax's entropy is below float32's resolution of log S near S = 1 (2**-24 absolute): compared to it.
    entropy_floor = LOG_TOTAL_ROUNDING * rows**0.5 / value_tol
    assert_close_rel(forward[4], entropy, value_tol, f"forward entropy ({impl.__name__})", scale=entropy_floor)
    back = torch.empty_like(rows3d)
    impl.backward(rows3d, labels, forward[1], g_logp, back, inv_temperature=inv_temperature, entropy=forward[4],
                  entropy_grad=g_entropy)
    assert_close_rel(back.reshape(rows, -1), grad, _grad_tol(grad, dtype, tol_scale),
                     f"backward dlogits ({impl.__name__})")

    # Training mode: the gradient of row_scale * sum(loss - entropy_coef * H), loss the kind's.
    row_scale = 1.0 / max(int(counted.sum()), 1)
    out3d = torch.empty_like(rows3d) if out3d is None else out3d
    fused = impl.forward_grad(rows3d, labels, aux, adv, out3d, torch.tensor(row_scale), loss_kind=kind.id,
                              inv_temperature=inv_temperature, entropy=True, entropy_coef=entropy_coef, **params)
    _, _, want = _reference(rows3d, labels, inv_temperature, row_scale * fused[3],
                            torch.where(counted, -entropy_coef * row_scale, 0.0))
    for i in range(5):
        assert_close_rel(fused[i], forward[i], VALUE_TOL, f"forward_grad output {i} ({impl.__name__})")
    assert_close_rel(out3d.reshape(rows, -1), want, _grad_tol(want, dtype, tol_scale),
                     f"forward_grad dlogits ({impl.__name__})")
    assert torch.equal(out3d.reshape(rows, -1)[~counted], torch.zeros_like(out3d.reshape(rows, -1)[~counted]))
    return forward, back, out3d


def _labels(rows, vocab, not_counted=()):
    labels = torch.randint(0, vocab, (rows,), dtype=torch.int32)
    labels[list(not_counted)] = -1
    return labels


# ----------------------------------------------------------------------------------------------------
# The implementations' contract.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_dtype_against_float64(impl, dtype):
    """(2, 3) rows x 150 columns (three blocks of 64, the last partial), one row that does not count, T = 0.7."""
    rows3d = (torch.randn(2, 3, 150) * 3).to(dtype)
    _check_impl(impl, rows3d, _labels(6, 150, [4]), inv_temperature=1 / 0.7)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_every_kind_keeps_its_outputs(impl, kind):
    """The entropy changes nothing else: the four outputs with it on equal those with it off."""
    rows3d = torch.randn(1, 4, 100) * 2
    labels = _labels(4, 100, [2])
    aux, adv = _token_data(kind, 4)
    off = impl.forward(rows3d, labels, aux, adv, loss_kind=kind.id, inv_temperature=1.3, **_params(kind))
    forward, _, _ = _check_impl(impl, rows3d, labels, kind, inv_temperature=1.3, token_data=(aux, adv))
    for a, b in zip(off, forward[:4], strict=True):
        assert_close_rel(b, a, 1e-6, f"{kind.name} output with the entropy on")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("vocab", [1, 5, 64, 65, 129])
def test_vocab_sizes(impl, vocab):
    """One column (entropy exactly 0), less than a block, a block, one past, several; a single row."""
    _check_impl(impl, torch.randn(1, 1, vocab) * 2, _labels(1, vocab))
    forward, _, _ = _check_impl(impl, torch.randn(1, 3, vocab) * 2, _labels(3, vocab, [0]))
    if vocab == 1:
        assert torch.equal(forward[4], torch.zeros(3))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_columns_add_nothing(impl, dtype):
    """-inf over whole blocks, one lane of every block, every other column, all but one column; an all -inf row
    has entropy 0 (not NaN)."""
    x = (torch.randn(1, 6, 200) * 2).to(dtype)
    x[0, 0, :128] = float("-inf")
    x[0, 1, 5::64] = float("-inf")
    x[0, 2, ::2] = float("-inf")
    x[0, 3, 64:] = float("-inf")
    x[0, 4, :199] = float("-inf")  # one finite column: entropy 0
    labels = torch.tensor([150, 64, 7, 3, 199, 10], dtype=torch.int32)
    forward, back, fused = _check_impl(impl, x[:, :5], labels[:5])
    assert forward[4][4] == 0.0
    assert all(torch.isfinite(t).all() for t in (*forward, back, fused))
    x[0, 5] = float("-inf")
    entropy = impl.forward(x, labels, torch.empty(0), torch.empty(0), loss_kind=LOGPROB.id, inv_temperature=1.0,
                           entropy=True)[4]
    assert entropy[5] == 0.0 and torch.isfinite(entropy).all()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("temperature", [1e-3, 0.25, 4.0, 1e3])
def test_temperatures(impl, temperature):
    """A cold softmax (entropy near 0, where H = log S - T / S must not cancel badly) and a hot one (near log V).
    float32 resolves exp(x / T - lse) only to about eps32 * |x / T| relative (torch's float32 path as well)."""
    x = torch.randn(1, 3, 100) * 2
    conditioning = max(1.0, x.abs().max().item() / temperature / 100)
    _check_impl(impl, x, _labels(3, 100, [1]), inv_temperature=1.0 / temperature, tol_scale=conditioning)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
def test_large_logits_do_not_cancel(impl):
    """Logits around 1e4: the entropy is computed relative to the row maximum, where ``lse - sum p z`` would lose
    ``1e4 * 2**-24`` to cancellation (4e-4 relative here; the log-probs themselves do lose it: not checked). The
    interpreter rounds ``x * log2(e)`` before subtracting the maximum (one FMA on a GPU): 1e-4 for it."""
    tol = 1e-4 if impl is not torch_backend else VALUE_TOL
    x = torch.randn(1, 3, 90) * 2 + 1e4
    labels = _labels(3, 90)
    zero = torch.zeros(3)
    _, want, _ = _reference(x, labels, 1.0, zero, zero)
    empty = torch.empty(0)
    entropy = impl.forward(x, labels, empty, empty, loss_kind=LOGPROB.id, inv_temperature=1.0, entropy=True)[4]
    assert_close_rel(entropy, want, tol, "entropy at logits of 1e4")
    fused = impl.forward_grad(x, labels, empty, empty, torch.empty_like(x), torch.tensor(1.0), loss_kind=LOGPROB.id,
                              inv_temperature=1.0, entropy=True, entropy_coef=1.0)[4]
    assert_close_rel(fused, want, tol, "forward_grad entropy at logits of 1e4")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
def test_strided_layouts_and_in_place(impl):
    """``logits[:, :-1]``, a vocabulary stride of 2 into a strided gradient buffer, and the gradient in place."""
    full = torch.randn(3, 4, 90) * 2
    _check_impl(impl, full[:, :-1], _labels(9, 90, [2]))
    out3d = torch.zeros(3, 4, 45 * 3)[..., 1::3]
    _check_impl(impl, full[..., ::2], _labels(12, 45), out3d=out3d)
    x = torch.randn(2, 2, 130)
    labels = _labels(4, 130, [3])
    pristine = x.clone()
    aux, adv = _token_data(APA, 4)
    impl.forward_grad(x, labels, aux, adv, x, torch.tensor(0.25), loss_kind=APA.id, inv_temperature=0.7,
                      entropy=True, entropy_coef=0.5, **_params(APA))
    dlogp = impl.forward(pristine, labels, aux, adv, loss_kind=APA.id, inv_temperature=0.7, **_params(APA))[3]
    _, _, want = _reference(pristine, labels, 0.7, 0.25 * dlogp, torch.where(labels >= 0, -0.5 * 0.25, 0.0))
    assert_close_rel(x.reshape(4, -1), want, GRAD_TOL[torch.float32], "in-place dlogits")


# ----------------------------------------------------------------------------------------------------
# The public ops: apa_fast.loss / ppo_loss / awr_loss (entropy_coef, return_entropy) and logprobs(return_entropy).
# ----------------------------------------------------------------------------------------------------
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]
LOSSES = {"apa": (apa_fast.loss, {"lam": 0.5}), "ppo": (apa_fast.ppo_loss, {"clip_eps": 0.2}),
          "awr": (apa_fast.awr_loss, {"lam": 0.5, "max_weight": 5.0})}
# Relative L2 against float64: values computed in float32 (every dtype); gradients stored in the logits' dtype.
OP_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1.6e-2), torch.float16: (2e-5, 2e-3)}


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"])
def design(request, monkeypatch):
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


def _run_loss(kind, backend, logits, labels, aux, adv, mask, *, entropy_coef, reduction="mean", weights=None,
              **kwargs):
    fn, hyper = LOSSES[kind]
    x = logits.detach().clone().requires_grad_()
    data = (aux, adv) if kind != "awr" else (adv,)
    value, entropy = fn(x, labels, *data, mask, **hyper, ignore_index=IGNORE, reduction=reduction, backend=backend,
                        entropy_coef=entropy_coef, return_entropy=True, **kwargs)
    assert not entropy.requires_grad and entropy.dtype == torch.float32 and entropy.shape == labels.shape
    (value if value.dim() == 0 else (value * weights).sum()).backward()
    return value.detach(), entropy, x.grad


def _check_loss(kind, backend, inputs, *, entropy_coef=0.3, reduction="mean", what="", **kwargs):
    logits, labels, aux, adv, mask, weights = inputs
    hyper = LOSSES[kind][1]
    got_value, got_entropy, got_grad = _run_loss(kind, backend, logits, labels, aux, adv, mask,
                                                 entropy_coef=entropy_coef, reduction=reduction, weights=weights,
                                                 **kwargs)
    want_value, want_entropy, want_grad = oracle(kind, logits, labels, aux, adv, mask, **hyper, reduction=reduction,
                                                 weights=weights, entropy_coef=entropy_coef, with_entropy=True,
                                                 **kwargs)
    value_tol, grad_tol = OP_TOL[logits.dtype]
    # A reduced value sums terms that may cancel: relative to the same reduction of |terms| (1 here: O(1) terms).
    assert_close_rel(got_value, want_value, value_tol, f"{what} value", scale=1.0 if want_value.dim() == 0 else 0.0)
    assert_close_rel(got_entropy, want_entropy, value_tol, f"{what} entropy")
    assert_close_rel(got_grad, want_grad, grad_tol + 2 * rel_err(want_grad.to(logits.dtype), want_grad),
                     f"{what} grad")
    return got_value, got_entropy, got_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_with_entropy_bonus(backend, kind, reduction, design):
    """loss - entropy_coef * entropy under every reduction, T = 0.7, V = 211 (no block multiple), with a mask."""
    inputs = make_inputs((3, 5), 211)
    _check_loss(kind, backend, inputs, reduction=reduction, temperature=0.7, what=f"{kind}/{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_logits(backend, dtype, design):
    _check_loss("apa", backend, make_inputs((2, 4), 300, dtype=dtype), entropy_coef=-0.5, what=str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_one_token_and_empty_mask(backend, design):
    inputs = make_inputs((2, 3), 97)
    _check_loss("ppo", backend, inputs, normalizer=7.0, what="normalizer")
    _check_loss("apa", backend, make_inputs((1,), 97, ignore_frac=0.0, mask_frac=0.0), what="one token")
    logits, labels, aux, adv, mask, weights = inputs
    value, entropy, grad = _check_loss("awr", backend, (logits, labels, aux, adv, torch.zeros_like(mask), weights),
                                       what="empty mask")
    assert value == 0.0 and torch.equal(entropy, torch.zeros_like(entropy))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_and_strided_logits(backend, design):
    """-inf columns (a masked vocabulary) in ``logits[:, :-1]`` of a contiguous buffer (read in place)."""
    full = torch.randn(2, 5, 130) * 2
    full[..., 100:] = float("-inf")
    full[0, 1, ::3] = float("-inf")
    logits = full[:, :-1]
    _, labels, aux, adv, mask, weights = make_inputs((2, 4), 99)
    labels[0, 1] = 3 * (labels[0, 1] // 3) + 1 if labels[0, 1] >= 0 else labels[0, 1]  # a finite label logit
    _check_loss("apa", backend, (logits, labels, aux, adv, mask, weights), what="-inf, strided")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_return_a_differentiable_entropy(backend, design):
    logits, labels, aux, adv, _, weights = make_inputs((3, 4), 150)
    logits[0, 0, :40] = float("-inf")
    labels[0, 0] = 77
    entropy_weights = torch.randn(3, 4)
    x = logits.clone().requires_grad_()
    logp, entropy = apa_fast.logprobs(x, labels, temperature=1.3, ignore_index=IGNORE, backend=backend,
                                      return_entropy=True)
    ((logp * weights).sum() + (entropy * entropy_weights).sum()).backward()
    want_logp, want_entropy, want_grad = oracle("logprobs", logits, labels, aux, adv, None, temperature=1.3,
                                                weights=weights, entropy_weights=entropy_weights, with_entropy=True)
    assert_close_rel(logp, want_logp, 2e-5, "logp")
    assert_close_rel(entropy, want_entropy, 2e-5, "entropy")
    assert_close_rel(x.grad, want_grad, 2e-5, "grad of logp and entropy")
    assert torch.equal(entropy[labels == IGNORE], torch.zeros_like(entropy[labels == IGNORE]))


def test_entropy_off_by_default_and_the_same_loss(design):
    """Without entropy the kernels run without it (entropy=False reaches the implementation); entropy_coef=0 with
    return_entropy gives the same loss as without."""
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 50)
    calls = []
    original = torch_backend.forward, torch_backend.forward_grad

    def spy(fn):
        return lambda *args, **kwargs: calls.append(kwargs.get("entropy", False)) or fn(*args, **kwargs)

    x = logits.clone().requires_grad_()
    try:
        torch_backend.forward, torch_backend.forward_grad = spy(original[0]), spy(original[1])
        plain = apa_fast.loss(x, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch")
        assert calls == [False]
        with_entropy, _ = apa_fast.loss(x, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch",
                                        return_entropy=True)
        assert calls == [False, True]
    finally:
        torch_backend.forward, torch_backend.forward_grad = original
    assert torch.equal(plain, with_entropy)


@pytest.mark.parametrize("change, error, match", [
    (dict(entropy_coef=True), ValueError, "entropy_coef must be a real number"),
    (dict(entropy_coef=float("nan")), ValueError, r"entropy_coef must be in \[-1e\+06, 1e\+06\]"),
    (dict(entropy_coef=2e6), ValueError, "entropy_coef must be in"),
    (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
])
def test_bad_entropy_arguments_raise(change, error, match):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    with pytest.raises(error, match=match):
        apa_fast.ppo_loss(logits, labels, aux, adv, mask, ignore_index=IGNORE, **change)
    if "return_entropy" in change:
        with pytest.raises(error, match=match):
            apa_fast.logprobs(logits, labels, ignore_index=IGNORE, **change)


# ----------------------------------------------------------------------------------------------------
# The linear ops: linear_loss / linear_ppo_loss / linear_awr_loss (entropy_coef) and linear_logprobs.
# ----------------------------------------------------------------------------------------------------
LINEAR_LOSSES = {"apa": (apa_fast.linear_loss, {"lam": 0.5}), "ppo": (apa_fast.linear_ppo_loss, {"clip_eps": 0.2}),
                 "awr": (apa_fast.linear_awr_loss, {"lam": 0.5, "max_weight": 5.0})}


def _projected64(hidden, weight, bias, *, logit_scale, logit_softcap):
    """float64 logits as the model computes them, differentiable in hidden, weight and bias."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    z = logit_scale * (h @ w.T + b)
    return (logit_softcap * torch.tanh(z / logit_softcap) if logit_softcap else z), (h, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [*LINEAR_LOSSES, "logprobs"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ops_with_entropy(backend, kind, reduction):
    """The float64 chain rule through scale, soft cap and temperature; chunks of 4 rows (several per call); the
    scalar reductions precompute the gradients in the forward, "none" recomputes them in the backward."""
    if kind == "logprobs" and reduction == "mean":
        pytest.skip("log-probs are per token")
    labels, aux, adv, mask, weights = make_token_data((3, 5), 61)
    hidden, weight, bias = torch.randn(3, 5, 8), torch.randn(61, 8) / 2, torch.randn(61)
    z, leaves = _projected64(hidden, weight, bias, logit_scale=1.5, logit_softcap=4.0)
    entropy_weights = torch.randn(3, 5)
    common = dict(temperature=0.7, weights=weights, with_entropy=True)
    if kind == "logprobs":
        want_value, want_entropy, dz = oracle(kind, z.detach(), labels, aux, adv, None, entropy_weights=entropy_weights,
                                              **common)
    else:
        want_value, want_entropy, dz = oracle(kind, z.detach(), labels, aux, adv, mask, **LINEAR_LOSSES[kind][1],
                                              reduction=reduction, entropy_coef=0.3, **common)
    z.backward(dz)
    x = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    options = dict(bias=x[2], temperature=0.7, logit_scale=1.5, logit_softcap=4.0, ignore_index=IGNORE,
                   backend=backend, chunk_size=4, return_entropy=True)
    if kind == "logprobs":
        value, entropy = apa_fast.linear_logprobs(x[0], x[1], labels, **options)
        ((value * weights).sum() + (entropy * entropy_weights).sum()).backward()
    else:
        fn, hyper = LINEAR_LOSSES[kind]
        data = (adv,) if kind == "awr" else (aux, adv)
        value, entropy = fn(x[0], x[1], labels, *data, mask, **hyper, **options, reduction=reduction,
                            entropy_coef=0.3)
        assert not entropy.requires_grad
        (value if value.dim() == 0 else (value * weights).sum()).backward()
    assert_close_rel(value, want_value, 2e-5, f"linear {kind} value", scale=1.0 if value.dim() == 0 else 0.0)
    assert_close_rel(entropy, want_entropy, 2e-5, f"linear {kind} entropy")
    for name, got, leaf in zip(("hidden", "weight", "bias"), x, leaves, strict=True):
        assert_close_rel(got.grad, leaf.grad, 2e-5, f"linear {kind} {name} grad")

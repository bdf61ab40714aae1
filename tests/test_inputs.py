"""Inputs users actually pass, by class: each accepted input gives the float64 answer, each refused one a clear
error. Both backends and both gradient designs wherever they apply.

Classes (issue 13 and the core-API part of issue 9): where an in-place gradient can land; every integer label
dtype; -inf logits; double backward; garbage in rows that do not count; the temperature range; per-sequence
values broadcast over tokens; 0/1 masks of any dtype and labels hidden by the mask; normalizer for
micro-batches; `apa_loss_from_logprobs`.
"""

import pytest
import torch
from conftest import assert_close_rel
from oracles import IGNORE, KINDS, TOLERANCES, check, make_inputs, oracle, run_fused

import apa_fast
from apa_fast import _dispatch

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                                    reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")),
    "torch",
]


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"])
def design(request, monkeypatch):
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


def _apa(x, labels, aux, adv, mask, backend, **kwargs):
    return apa_fast.loss(x, labels, aux, adv, mask, ignore_index=IGNORE, backend=backend, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Class: an in-place gradient lands in the logits' own memory, or in a new buffer; never in a copy.
# ----------------------------------------------------------------------------------------------------
def _layouts_without_own_memory():
    yield "3 leading dims that do not merge (copied)", torch.randn(2, 3, 5, 50)[:, :-1, :-1]
    yield "expanded over the batch (stride 0)", torch.randn(1, 4, 77).expand(3, 4, 77)
    yield "expanded over the vocabulary", torch.randn(2, 3, 1).expand(2, 3, 40)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, logits", list(_layouts_without_own_memory()), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_inplace_backward_falls_back_to_a_new_buffer(backend, name, logits):
    _, labels, aux, adv, mask, _ = make_inputs(logits.shape[:-1], logits.shape[-1])
    _, want = oracle("apa", logits, labels, aux, adv, mask)
    # The same strides over the memory of a non-leaf (a model's output): only the layout refuses the write.
    owner = logits._base.detach().requires_grad_() * 1
    x = owner.as_strided(logits.shape, logits.stride(), logits.storage_offset())
    x.retain_grad()
    before = owner.detach().clone()
    _apa(x, labels, aux, adv, mask, backend, inplace_backward=True).backward()
    assert_close_rel(x.grad, want, 2e-5, name)
    assert torch.equal(owner.detach(), before), "the logits must be left untouched when the gradient cannot land there"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_through_vocab_strides(backend):
    base = torch.randn(2, 3, 2 * 61, requires_grad=True) * 1  # a non-leaf, as a model's logits
    x = base[..., ::2]  # vocabulary stride 2: its own memory, no copy
    x.retain_grad()
    _, labels, aux, adv, mask, _ = make_inputs(x.shape[:-1], x.shape[-1])
    _, want = oracle("apa", x, labels, aux, adv, mask)
    _apa(x, labels, aux, adv, mask, backend, inplace_backward=True).backward()
    assert_close_rel(x.detach(), want, 2e-5, "gradient written over the strided logits")
    assert_close_rel(x.grad, want, 2e-5, "x.grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_is_loud_when_another_op_needs_the_logits(backend):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 101)
    x = logits.clone().requires_grad_() * 1  # a non-leaf, as a model's logits
    square = (x * x).sum()  # saves x; autograd runs its backward after the loss's, which overwrote x
    total = square + _apa(x, labels, aux, adv, mask, backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


# ----------------------------------------------------------------------------------------------------
# Class: every integer label dtype gives the int64 answer; other dtypes are refused.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_integer_label_dtype(backend, dtype):
    vocab = 300 if dtype in (torch.uint8, torch.int16, torch.int32, torch.int64) else 120
    logits, labels, aux, adv, mask, weights = make_inputs((3, 4), vocab)
    if dtype == torch.uint8:
        labels = labels.clamp(min=0)  # no -100 in uint8; labels up to 255 include 156 (= -100 mod 256)
        labels[0, 0] = 156
        labels = labels.clamp(max=255)
    got = apa_fast.logprobs(logits, labels.to(dtype), ignore_index=IGNORE, backend=backend)
    want = apa_fast.logprobs(logits, labels, ignore_index=IGNORE, backend=backend)
    assert torch.equal(got, want)
    if dtype == torch.uint8:
        assert got[0, 0] != 0, "label 156 must count in uint8"
    check("apa", backend, logits, labels.to(dtype), aux, adv, mask, weights, what=str(dtype))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.bool, torch.float32])
def test_label_dtypes_that_are_refused(dtype):
    logits = torch.randn(2, 10)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        apa_fast.logprobs(logits, torch.ones(2, dtype=dtype))


# ----------------------------------------------------------------------------------------------------
# Class: -inf logits (masked vocabularies) anywhere in a counted row.
# ----------------------------------------------------------------------------------------------------
def _minus_inf_patterns(vocab):
    yield "leading block", slice(0, 4096)
    yield "trailing block", slice(4096, vocab)
    yield "every other column", slice(1, vocab, 2)
    yield "all but the first column", slice(1, vocab)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend, design):
    vocab = 5000  # two blocks of 4096 on the Triton path
    for name, columns in _minus_inf_patterns(vocab):
        logits, labels, aux, adv, _, weights = make_inputs((2,), vocab, ignore_frac=0.0)
        logits[:, columns] = float("-inf")
        finite = torch.isfinite(logits[0]).nonzero()[:, 0]
        labels = finite[torch.randint(0, finite.numel(), (2,))]
        want_value, want_grad = oracle("apa", logits, labels, aux, adv, None)
        got_value, got_grad = run_fused("apa", backend, logits, labels, aux, adv, None)
        assert_close_rel(got_value, want_value, 2e-5, f"{name} value")
        assert_close_rel(got_grad, want_grad, 2e-5, f"{name} grad")
        logp = apa_fast.logprobs(logits, labels, backend=backend)
        assert torch.isfinite(logp).all(), name


# ----------------------------------------------------------------------------------------------------
# Class: the ops are differentiable once, and say so when differentiated twice.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend, design):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 50)
    x = logits.clone().requires_grad_()
    for reduction in ("mean", "none"):
        out = _apa(x, labels, aux, adv, mask, backend, reduction=reduction)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert grad.requires_grad  # a penalty built on it is not silently constant...
        with pytest.raises(RuntimeError, match="differentiable once"):
            grad.square().sum().backward()  # ...it raises


def test_double_backward_is_refused_by_the_linear_ops():
    hidden, weight = torch.randn(2, 3, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 3))
    ref, adv = torch.randn(2, 3) - 3.0, torch.randn(2, 3)
    for out in (apa_fast.linear_logprobs(hidden, weight, labels).sum(),
                apa_fast.linear_loss(hidden, weight, labels, ref, adv)):
        grads = torch.autograd.grad(out, (hidden, weight), create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            sum(g.square().sum() for g in grads).backward()


# ----------------------------------------------------------------------------------------------------
# Class: whatever rows that do not count hold (NaN, inf) stays out of every output.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), float("-inf")])
def test_garbage_in_rows_that_do_not_count(backend, design, garbage):
    logits, labels, aux, adv, mask, _ = make_inputs((3, 4), 150, ignore_frac=0.3, mask_frac=0.3)
    mask[0, 0] = False  # at least one skipped row, whatever the random draw (all 12 counted: 0.49**12 = 2e-4 of seeds)
    skipped = ~mask | (labels == IGNORE)
    logits[skipped] = garbage
    logits[skipped.nonzero()[0, 0], skipped.nonzero()[0, 1], 7] = 1.0  # a mixed row too
    want_value, want_grad = oracle("apa", logits.masked_fill(skipped[..., None], 0.0), labels, aux, adv, mask)
    got_value, got_grad = run_fused("apa", backend, logits, labels, aux, adv, mask)
    assert_close_rel(got_value, want_value, 2e-5, "value")
    assert torch.equal(got_grad[skipped], torch.zeros_like(got_grad[skipped]))
    assert_close_rel(got_grad, want_grad, 2e-5, "grad")


# ----------------------------------------------------------------------------------------------------
# Class: every accepted temperature gives finite, correct results; the rest are refused.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-6, 3e-3, 1.0, 250.0, 1e6])
def test_accepted_temperatures_are_exact(backend, design, temperature):
    # Logits of the temperature's magnitude: logits / T of order 1, so that float32 (whose softmax error grows
    # as |logits / T| * 6e-8, in any implementation) can meet the float64 tolerance; what is tested is that the
    # scaling itself never overflows, flushes to zero or makes NaN.
    for kind in KINDS:
        inputs = make_inputs((2, 3), 70, scale=3.0 * temperature)
        check(kind, backend, *inputs, temperature=temperature, what=f"{kind} T={temperature}")


@pytest.mark.parametrize("temperature", [0.0, -1.0, 9.9e-7, 1.01e6, 1e-39, 1e46, float("inf"), True])
def test_temperatures_outside_the_range_are_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        apa_fast.logprobs(torch.randn(2, 5), torch.ones(2, dtype=torch.long), temperature=temperature)


@pytest.mark.parametrize("name, kwargs", [("lam", {"lam": True}), ("normalizer", {"normalizer": False}),
                                          ("lam", {"lam": "1"}), ("normalizer", {"normalizer": 0})])
def test_hyper_parameters_are_numbers_not_bools(name, kwargs):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    with pytest.raises(ValueError, match=name):
        apa_fast.loss(logits, labels, aux, adv, mask, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Per-sequence values broadcast over the tokens; 0/1 masks of any dtype; labels hidden by the mask.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_values_broadcast_over_tokens(backend):
    logits, labels, _, _, mask, _ = make_inputs((3, 5), 97)
    ref, adv = -torch.rand(3) - 4.0, torch.randn(3)
    want = _apa(logits, labels, ref[:, None].expand(3, 5), adv[:, None].expand(3, 5), mask, backend)
    for shape in [(3,), (3, 1)]:
        for name, kwargs in [("ref_logprobs", dict(aux=ref.reshape(shape), adv=adv[:, None].expand(3, 5))),
                             ("advantages", dict(aux=ref[:, None].expand(3, 5), adv=adv.reshape(shape)))]:
            got = _apa(logits, labels, kwargs["aux"], kwargs["adv"], mask, backend)
            assert torch.equal(got, want), (name, shape)
    ppo = apa_fast.ppo_loss(logits, labels, ref, adv, mask, ignore_index=IGNORE, backend=backend)
    assert torch.isfinite(ppo)
    want_value, _ = oracle("awr", logits, labels, None, adv, mask)
    assert_close_rel(apa_fast.awr_loss(logits, labels, adv[:, None], mask, ignore_index=IGNORE, backend=backend),
                     want_value, 2e-5, "awr with (B, 1) advantages")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_of_every_dtype(backend):
    logits, labels, aux, adv, mask, _ = make_inputs((4, 6), 64)
    want = _apa(logits, labels, aux, adv, mask, backend)
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.int32):
        assert torch.equal(_apa(logits, labels, aux, adv, mask.to(dtype), backend), want), dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_hidden_by_the_mask_are_not_range_checked(backend):
    logits, labels, aux, adv, mask, _ = make_inputs((3, 4), 40, ignore_frac=0.0)
    mask[1, 2] = False  # at least one hidden label, whatever the random mask drew (all 12 kept: 3% of seeds)
    padded = torch.where(mask, labels, 50_000)  # a pad id far outside the vocabulary, masked out
    assert torch.equal(_apa(logits, padded, aux, adv, mask, backend), _apa(logits, labels, aux, adv, mask, backend))
    with pytest.raises(ValueError, match="found 50000"):
        _apa(logits, padded, aux, adv, None, backend)


# ----------------------------------------------------------------------------------------------------
# normalizer: micro-batches and ranks add up to the mean over the whole batch.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_makes_micro_batches_add_up(backend, design):
    logits, labels, aux, adv, mask, _ = make_inputs((4, 5), 90)
    full = logits.clone().requires_grad_()
    _apa(full, labels, aux, adv, mask, backend).backward()
    counted = int(((labels != IGNORE) & mask).sum())
    part = logits.clone().requires_grad_()
    total = 0.0
    for rows, normalizer in ((slice(0, 1), counted), (slice(1, 4), torch.tensor(float(counted)))):
        piece = _apa(part[rows], labels[rows], aux[rows], adv[rows], mask[rows], backend, normalizer=normalizer)
        piece.backward()  # accumulates into part.grad, as gradient accumulation does
        total = total + piece.detach()
    want_value, want_grad = oracle("apa", logits, labels, aux, adv, mask)
    assert_close_rel(total, want_value, 2e-5, "sum of micro-batch losses")
    assert_close_rel(part.grad, want_grad, 2e-5, "accumulated gradient")
    assert_close_rel(part.grad, full.grad, 2e-5, "same as the full batch")


def test_normalizer_needs_the_mean():
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    with pytest.raises(ValueError, match="normalizer applies to reduction='mean'"):
        apa_fast.loss(logits, labels, aux, adv, mask, reduction="sum", normalizer=10)
    with pytest.raises(ValueError, match="normalizer must be a number or a 0-dim"):
        apa_fast.loss(logits, labels, aux, adv, mask, normalizer=torch.ones(2))


def test_apa_loss_from_logprobs_matches_the_fused_loss():
    logits, labels, aux, adv, mask, _ = make_inputs((3, 6), 80, ignore_frac=0.0)
    x = logits.clone().requires_grad_()
    logp = apa_fast.logprobs(x, labels)
    got = apa_fast.apa_loss_from_logprobs(logp, aux, adv[:, :1], mask.float(), lam=0.5)
    got.backward()
    want_value, want_grad = oracle("apa", logits, labels, aux, adv[:, :1], mask, lam=0.5)
    assert_close_rel(got, want_value, 2e-5, "value")
    assert_close_rel(x.grad, want_grad, 2e-5, "grad through logprobs")
    per_token = apa_fast.apa_loss_from_logprobs(logp.detach(), aux, adv, mask, reduction="none")
    assert per_token.shape == (3, 6) and torch.equal(per_token[~mask], torch.zeros_like(per_token[~mask]))
    summed = apa_fast.apa_loss_from_logprobs(logp.detach(), aux, adv, mask, normalizer=7)
    assert torch.allclose(summed * 7, per_token.sum())
    with pytest.raises(ValueError, match="advantages must have the token shape"):
        apa_fast.apa_loss_from_logprobs(logp, aux, adv[:2], mask)


def test_tolerances_cover_every_logit_dtype():
    assert set(TOLERANCES) == set(apa_fast.validation.LOGIT_DTYPES)

"""Hyper-parameter ranges and the one validation path every entry point shares (issue 19, items 8, 9 and 14).

Classes:
- every value at the ends of a stated range gives the float64 answer on both backends and both gradient designs,
  zero advantages included (item 8: ``lam=1e-40`` made ``1/lam`` inf and ``0 * inf`` NaN);
- every value outside a range is refused with an error naming the argument and the range, before any kernel runs
  (item 9: ``clip_eps=3.5e38`` / ``max_weight=3.5e38`` raised an internal error on the torch backend only);
- the same rules at every entry point: NumPy scalars accepted, bools refused, the same range and message from the
  ops, `APALoss`, the TRL, OpenRLHF and verl adapters (item 14); the normalizer checked before its float32
  conversion, with its own value in the message; `APALoss` takes a normalizer.
"""

import re

import numpy as np
import pytest
import torch
from conftest import assert_close_rel
from oracles import IGNORE, float32_floor, make_inputs, oracle

import apa_fast
from apa_fast import _dispatch
from apa_fast.integrations import openrlhf, verl
from apa_fast.kinds import HYPER_RANGES
from apa_fast.validation import NORMALIZER

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                                    reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")),
    "torch",
]
LOW, HIGH = HYPER_RANGES["lam"].low, HYPER_RANGES["lam"].high


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"])
def design(request, monkeypatch):
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


def _op(kind, x, labels, aux, adv, mask, **kwargs):
    """The fused op of ``kind``, on the arguments `oracles.oracle` takes (``aux`` unused by AWR)."""
    common = dict(ignore_index=IGNORE, **kwargs)
    if kind == "apa":
        return apa_fast.loss(x, labels, aux, adv, mask, **common)
    if kind == "ppo":
        return apa_fast.ppo_loss(x, labels, aux, adv, mask, **common)
    return apa_fast.awr_loss(x, labels, adv, mask, **common)


def _assert_float64(kind, got, got_grad, logits, labels, aux, adv, mask, what, **kwargs):
    """``got`` (and ``got_grad``, the gradient of ``got``, or None) against the float64 oracle, with the floors of
    `oracles.check`: float32 log-probs (`float32_floor`) and, for a reduced value, the magnitude of its terms."""
    weights = torch.ones(labels.shape)
    want_value, want_grad = oracle(kind, logits, labels, aux, adv, mask, weights=weights, **kwargs)
    floor_value, floor_grad = float32_floor(kind, logits, labels, aux, adv, mask, want_value, want_grad,
                                            weights=weights, **kwargs)
    terms, _ = oracle(kind, logits, labels, aux, adv, mask, weights=weights, **{**kwargs, "reduction": "none"})
    scale = terms.abs().sum().item() / (kwargs.get("normalizer") or max(int((terms != 0).sum()), 1))
    assert torch.isfinite(got).all(), what
    assert_close_rel(got, want_value, 2e-5, f"{what} value", scale=max(scale if got.dim() == 0 else 0.0,
                                                                         floor_value / 2e-5))
    if got_grad is not None:
        assert torch.isfinite(got_grad).all(), what
        assert_close_rel(got_grad, want_grad, 2e-5, f"{what} grad", scale=floor_grad / 2e-5)


def _zero_some_advantages(adv):
    adv = adv.clone()
    adv.view(-1)[::2] = 0.0  # the reproducer's zeros beside ordinary advantages
    return adv


# ----------------------------------------------------------------------------------------------------
# Class: every accepted value, the ends of each range included, gives the float64 answer.
# ----------------------------------------------------------------------------------------------------
# (kind, argument, value): both ends of every range of the kinds, one value inside, and the normalizer's ends.
ENDS = [(kind, name, value) for kind, names in (("apa", ["lam"]), ("ppo", ["clip_eps"]), ("awr", ["lam", "max_weight"]))
        for name in names for value in (HYPER_RANGES[name].low, 0.37, HYPER_RANGES[name].high)]
ENDS += [("apa", "normalizer", NORMALIZER.low), ("awr", "normalizer", NORMALIZER.high)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, name, value", ENDS, ids=[f"{k}-{n}={v:g}" for k, n, v in ENDS])
def test_accepted_values_give_the_float64_answer(backend, design, kind, name, value):
    logits, labels, aux, adv, mask, _ = make_inputs((3, 5), 19)
    adv = _zero_some_advantages(adv)
    x = logits.clone().requires_grad_()
    got = _op(kind, x, labels, aux, adv, mask, backend=backend, **{name: value})
    got.backward()
    _assert_float64(kind, got.detach(), x.grad, logits, labels, aux, adv, mask, f"{kind} {name}={value:g}",
                    **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["apa", "awr"])
def test_zero_advantages_at_the_smallest_lam(backend, kind):
    """Item 8's reproducer at the smallest accepted lam, per token: 0 * (1/lam) is 0, and the answer is finite."""
    logits, labels, aux, _, mask, _ = make_inputs((2, 7), 23)
    adv = torch.zeros(2, 7)
    for reduction in ("none", "mean"):
        got = _op(kind, logits, labels, aux, adv, mask, lam=LOW, reduction=reduction, backend=backend)
        _assert_float64(kind, got, None, logits, labels, aux, adv, mask, f"{kind} {reduction}", lam=LOW,
                        reduction=reduction)


def test_apa_loss_from_logprobs_at_the_ends_of_lam():
    logp, ref = -torch.rand(3, 4, dtype=torch.float64) - 1.0, -torch.rand(3, 4, dtype=torch.float64) - 1.0
    adv = _zero_some_advantages(torch.randn(3, 4, dtype=torch.float64))
    for lam in (LOW, HIGH):
        want = ((logp - ref - adv / lam) ** 2).mean()
        got = apa_fast.apa_loss_from_logprobs(logp.float(), ref.float(), adv.float(), lam=lam)
        assert_close_rel(got, want, 2e-6, f"lam={lam:g}")


def test_linear_loss_at_the_ends_of_its_ranges():
    hidden, weight = torch.randn(2, 3, 8), torch.randn(13, 8) * 0.3
    labels, ref = torch.randint(0, 13, (2, 3)), -torch.rand(2, 3) - 2.0
    adv = _zero_some_advantages(torch.randn(2, 3))
    for kwargs in (dict(lam=LOW), dict(lam=HIGH), dict(logit_scale=1e-6), dict(logit_scale=1e6 / 64, temperature=1e6),
                   dict(logit_softcap=1e-6), dict(logit_softcap=1e6)):
        logits = (hidden.double() @ weight.double().T) * kwargs.get("logit_scale", 1.0)
        if "logit_softcap" in kwargs:
            logits = kwargs["logit_softcap"] * torch.tanh(logits / kwargs["logit_softcap"])
        want, _ = oracle("apa", logits, labels, ref, adv, None, lam=kwargs.get("lam", 1.0),
                         temperature=kwargs.get("temperature", 1.0))
        got = apa_fast.linear_loss(hidden, weight, labels, ref, adv, backend="torch", **kwargs)
        assert_close_rel(got, want, 2e-5, str(kwargs))


# ----------------------------------------------------------------------------------------------------
# Class: values outside a range are refused, naming the argument and the range, on both backends.
# ----------------------------------------------------------------------------------------------------
def _outside(low, high):
    """Just outside both ends, the issue's reproducers, and non-finite values."""
    return [low * 0.99, high * 1.01, 1e-40, 1e-300, 3.5e38, float("inf"), float("nan"), 0.0, -1.0]


REFUSED = [(kind, name, value) for kind, names in (("apa", ["lam", "normalizer"]), ("ppo", ["clip_eps"]),
                                                  ("awr", ["lam", "max_weight"]))
           for name in names
           for value in _outside(*(NORMALIZER if name == "normalizer" else HYPER_RANGES[name])[:2])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, name, value", REFUSED, ids=[f"{k}-{n}={v:g}" for k, n, v in REFUSED])
def test_values_outside_the_ranges_are_refused(backend, kind, name, value):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    low, high, _ = NORMALIZER if name == "normalizer" else HYPER_RANGES[name]
    with pytest.raises(ValueError, match=re.escape(f"{name} must be in [{low:g}, {high:g}], got {value!r}")):
        _op(kind, logits, labels, aux, adv, mask, backend=backend, **{name: value})


@pytest.mark.parametrize("lam", [1e-300, 1e-40, 2e6, float("nan")])
def test_apa_loss_from_logprobs_refuses_lam_outside_the_range(lam):
    with pytest.raises(ValueError, match=r"lam must be in \[1e-06, 1e\+06\]"):
        apa_fast.apa_loss_from_logprobs(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3), lam=lam)


@pytest.mark.parametrize("name, value", [("logit_scale", 1e-40), ("logit_scale", 1e7), ("logit_softcap", 1e-40),
                                         ("logit_softcap", float("inf")), ("lam", 1e-40), ("temperature", 1e-7)])
def test_linear_ops_refuse_values_outside_the_ranges(name, value):
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    with pytest.raises(ValueError, match=rf"{name} must be in \["):
        apa_fast.linear_loss(hidden, weight, labels, torch.randn(2, 3), torch.zeros(2, 3), **{name: value})


# ----------------------------------------------------------------------------------------------------
# Class: one validation path; NumPy scalars accepted, bools refused, at every entry point.
# ----------------------------------------------------------------------------------------------------
def _lam_entry_points():
    """Every entry point that takes APA's lam, as (name of its argument, a call with that value)."""
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(11, 4)
    yield "lam", lambda lam: apa_fast.loss(logits, labels, aux, adv, mask, lam=lam)
    yield "lam", lambda lam: apa_fast.awr_loss(logits, labels, adv, mask, lam=lam)
    yield "lam", lambda lam: apa_fast.apa_loss_from_logprobs(aux, aux, adv, mask, lam=lam)
    yield "lam", lambda lam: apa_fast.linear_loss(hidden, weight, labels, aux, adv, mask, lam=lam)
    yield "lam", lambda lam: apa_fast.APALoss(lam)
    yield "lam", lambda lam: openrlhf.APAPolicyLoss(lam)
    yield "lam", lambda lam: openrlhf.apa_actor_trainer(object, lam)
    yield "lam", lambda lam: verl.hydra_overrides(lam)
    yield "lam", lambda lam: verl.check_config(_verl_config(lam), lam)


def _verl_config(lam):
    """A verl config on the APA recipe (what `verl.hydra_overrides` sets)."""
    actor = dict(policy_loss=dict(loss_mode="gpg"), use_kl_loss=True, kl_loss_type="mse", entropy_coeff=0,
                 kl_loss_coef=lam)
    return dict(actor_rollout_ref=dict(actor=actor),
                algorithm=dict(use_kl_in_reward=False, rollout_correction=dict(rollout_is=None)))


@pytest.mark.parametrize("lam", [True, False, np.bool_(True), "0.5", torch.tensor(0.5), None, 1e-40,
                                 np.float32(1e-40), np.float64(2e6), float("inf"), -1])
def test_every_entry_point_refuses_a_bad_lam_alike(lam):
    messages = set()
    for name, call in _lam_entry_points():
        with pytest.raises(ValueError, match=f"{name} must be") as info:
            call(lam)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("lam", [np.float32(0.5), np.float64(0.5), np.int64(2), np.float16(0.25), 3])
def test_every_entry_point_accepts_numpy_scalars(lam):
    for _, call in _lam_entry_points():
        call(lam)
    assert f"actor_rollout_ref.actor.kl_loss_coef={float(lam)!r}" in verl.hydra_overrides(lam)
    assert apa_fast.APALoss(lam).lam == float(lam) and openrlhf.APAPolicyLoss(lam).lam == float(lam)


def test_trl_apa_lam_goes_through_the_shared_validator():
    trl_integration = pytest.importorskip("apa_fast.integrations.trl")
    for lam in (True, np.bool_(False), 1e-40, float("nan")):
        # Refused before TRL builds anything: no model is needed to see the error.
        with pytest.raises(ValueError, match=r"apa_lam must be (in \[1e-06|a real number)"):
            trl_integration.APAGRPOTrainer(apa_lam=lam)
    with pytest.raises(ValueError, match="apa_mode must be one of"):
        trl_integration.APAGRPOTrainer(apa_lam=np.float32(0.5), apa_mode="hidden")


def test_numpy_values_give_the_float64_answer_of_their_own_value():
    """A NumPy float16 lam is its own value, converted exactly: 1/lam is not computed in float16 (where
    1 / float16(1e-5) overflows)."""
    logits, labels, aux, adv, mask, _ = make_inputs((2, 5), 17)
    for lam in (np.float16(1e-5), np.float32(3e-6), np.int64(3)):
        want, _ = oracle("apa", logits, labels, aux, adv, mask, lam=float(lam), temperature=0.5)
        got = apa_fast.loss(logits, labels, aux, adv, mask, lam=lam, temperature=np.float16(0.5), backend="torch")
        assert_close_rel(got, want, 2e-5, repr(lam))


def test_integer_arguments_accept_numpy_integers_and_refuse_bools():
    hidden, weight, labels = torch.randn(3, 5, 4), torch.randn(9, 4), torch.randint(0, 9, (3, 5))
    ref, adv = -torch.rand(3, 5) - 2.0, torch.randn(3, 5)
    want = apa_fast.linear_loss(hidden, weight, labels, ref, adv, chunk_size=4, ignore_index=-1)
    for chunk_size, ignore_index in ((np.int64(4), np.int32(-1)), (np.uint8(4), np.int64(-1))):
        got = apa_fast.linear_loss(hidden, weight, labels, ref, adv, chunk_size=chunk_size, ignore_index=ignore_index)
        assert torch.equal(got, want)
    for kwargs in (dict(chunk_size=True), dict(chunk_size=np.float64(4.0)), dict(chunk_size=0),
                   dict(ignore_index=True), dict(ignore_index=np.float32(-1)), dict(ignore_index=2**63)):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"{name} must be"):
            apa_fast.linear_loss(hidden, weight, labels, ref, adv, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Class: the normalizer, a number or a tensor, checked before its float32 conversion.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, shown", [(1e300, "1e+300"), (1e-40, "1e-40"), (1e13, "10000000000000.0"),
                                          (np.float64(1e300), "1e+300")])
def test_a_number_normalizer_is_reported_as_given(value, shown):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    match = re.escape("normalizer must be in [1e-06, 1e+12], got ") + ".*" + re.escape(shown)
    with pytest.raises(ValueError, match=match):
        apa_fast.loss(logits, labels, aux, adv, mask, normalizer=value)


@pytest.mark.parametrize("value, dtype, shown", [(1e300, torch.float64, "1e+300"), (1e-40, torch.float64, "1e-40"),
                                                 (10**13, torch.int64, "10000000000000"),
                                                 (float("inf"), torch.float32, "inf")])
def test_a_tensor_normalizer_is_checked_in_its_own_dtype(value, dtype, shown):
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    normalizer = torch.tensor(value, dtype=dtype)
    for call in (lambda: apa_fast.loss(logits, labels, aux, adv, mask, normalizer=normalizer),
                 lambda: apa_fast.apa_loss_from_logprobs(aux, aux, adv, None, normalizer=normalizer)):
        with pytest.raises(ValueError, match=re.escape(f"normalizer must be in [1e-06, 1e+12], got {shown} (a ")):
            call()


def test_a_float64_tensor_normalizer_in_range_gives_the_float64_answer():
    logits, labels, aux, adv, mask, _ = make_inputs((3, 4), 29)
    for value in (1e-6, 3.5, 1e12):
        want, _ = oracle("apa", logits, labels, aux, adv, mask, normalizer=value)
        got = apa_fast.loss(logits, labels, aux, adv, mask, normalizer=torch.tensor(value, dtype=torch.float64))
        assert got.dtype == torch.float32
        assert_close_rel(got, want, 2e-5, f"normalizer={value:g}")


# ----------------------------------------------------------------------------------------------------
# Class: APALoss validates at construction and takes the normalizer of the gradient-accumulation recipe.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=-1), r"lam must be in \["), (dict(lam=float("inf")), r"lam must be in \["),
    (dict(lam=True), "lam must be a real number"), (dict(temperature=0.0), r"temperature must be in \["),
    (dict(ignore_index=1.5), "ignore_index must be an int"), (dict(reduction="avg"), "reduction must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_apa_loss_module_refuses_bad_hyper_parameters_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apa_fast.APALoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apa_loss_module_micro_batches_add_up_with_a_normalizer(backend):
    logits, labels, aux, adv, mask, _ = make_inputs((5, 4), 31)
    module = apa_fast.APALoss(lam=0.4, temperature=0.8, ignore_index=IGNORE, backend=backend)
    counted = int(((labels != IGNORE) & mask).sum())
    x = logits.clone().requires_grad_()
    total = 0.0
    for rows, normalizer in ((slice(0, 2), counted), (slice(2, 5), torch.tensor(counted))):
        piece = module(x[rows], labels[rows], aux[rows], adv[rows], mask[rows], normalizer=normalizer)
        piece.backward()
        total = total + piece.detach()
    want_value, want_grad = oracle("apa", logits, labels, aux, adv, mask, lam=0.4, temperature=0.8)
    assert_close_rel(total, want_value, 2e-5, "sum of the micro-batch losses")
    assert_close_rel(x.grad, want_grad, 2e-5, "accumulated gradient")
    with pytest.raises(ValueError, match=r"normalizer must be in \["):
        module(logits, labels, aux, adv, mask, normalizer=1e-40)


# ----------------------------------------------------------------------------------------------------
# Class: the OpenRLHF loss checks its lam at construction and its tensors under OpenRLHF's names.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, change", [
    ("old_log_probs", dict(old_log_probs=torch.randn(3, 4))), ("old_log_probs", dict(old_log_probs=torch.randn(5))),
    ("old_log_probs", dict(old_log_probs=torch.ones(2, 5, dtype=torch.long))),
    ("ref_log_probs", dict(ref_log_probs=torch.randn(2, 4))),
])
def test_openrlhf_loss_names_the_mismatched_tensor(name, change):
    log_probs = -torch.rand(2, 5, requires_grad=True)
    args = dict(log_probs=log_probs, old_log_probs=-torch.rand(2, 5), advantages=torch.randn(2, 5),
                ref_log_probs=-torch.rand(2, 5)) | change
    with pytest.raises((ValueError, TypeError), match=f"{name} must"):
        openrlhf.APAPolicyLoss(0.5)(**args)


def test_openrlhf_install_names_a_bad_environment_value(monkeypatch):
    monkeypatch.setenv("APA_FAST_LAM", "zero")
    with pytest.raises(ValueError, match="APA_FAST_LAM must be a number"):
        openrlhf.install()
    monkeypatch.setenv("APA_FAST_LAM", "1e-40")
    with pytest.raises(ValueError, match=re.escape("lam must be in [1e-06, 1e+06], got 1e-40")):
        openrlhf.install()

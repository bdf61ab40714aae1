"""Autograd beyond ``loss.backward()`` for every public op, both backends and both gradient designs (issue 19,
items 3, 6 and 10), against float64 references written as plain functions (so that torch.func transforms them).

Classes:
- forward mode and torch.func: ``torch.func.jvp`` / ``jacfwd`` and ``torch.autograd.forward_ad`` give the float64
  tangent (they gave 0 or None); ``torch.func.grad`` / ``vjp`` / ``jacrev`` and ``vmap`` give the float64 answer
  (they raised "must override the setup_context staticmethod"); second order (``hessian``, ``jacrev(jacrev)``)
  raises the ops' "differentiable once" error, never a silent 0;
- ``inplace_backward=True`` never writes into a leaf's memory (an ``nn.Parameter`` used as logits, a view of one):
  the gradient goes to a new buffer, and a non-leaf still receives it in place;
- a retained graph in training mode: what ``torch.autograd.grad(..., retain_graph=True)`` returns does not share
  memory with the saved gradient, while a single ``loss.backward()`` still makes no logits-sized copy.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import assert_close_rel
from oracles import IGNORE, entropy64, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import apa_fast
from apa_fast import _dispatch, logprob
from apa_fast.kinds import BY_NAME

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                                    reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")),
    "torch",
]
# float32 kernels against float64 references: log-probs are accurate to a few float32 roundings of |logits|.
TOL = 2e-5


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"])
def design(request, monkeypatch):
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


def _token_data(rows_shape, vocab):
    """Logits and labels of `make_inputs` (odd sizes, ignored labels, a mask with holes); ref/old log-probs and
    advantages keeping the APA residual below -2.4 (no float32 cancellation) and PPO ratios on both sides of 1."""
    logits, labels, _, _, mask, weights = make_inputs(rows_shape, vocab)
    aux = -0.5 * torch.rand(rows_shape) - 0.1 - torch.log(torch.tensor(float(vocab)))
    adv = torch.rand(rows_shape) + 3.0
    return logits, dict(labels=labels, aux=aux, adv=adv, mask=mask, weights=weights)


def _logp64(z, d, temperature, use_mask=True):
    counted = d["labels"] != IGNORE
    if use_mask:
        counted = counted & d["mask"]
    logp = torch.log_softmax(z / temperature, -1).gather(-1, torch.where(counted, d["labels"], 0)[..., None])[..., 0]
    return torch.where(counted, logp, 0.0), counted


def _loss64(kind, logp, counted, d, reduction="mean", normalizer=None, **hyper):
    spec = BY_NAME[kind]
    aux = None if spec.aux is None else d["aux"].double()
    terms = torch.where(counted, spec.reference(logp, aux, d["adv"].double(), **hyper), 0.0)
    if reduction == "none":
        return terms
    return terms.sum() / (normalizer or counted.sum().clamp(min=1)) if reduction == "mean" else terms.sum()


# (name, op(x, d, backend), float64 reference(x64, d)): every logits op, each reduction, a temperature, a normalizer.
LOGITS_OPS = [
    ("loss", lambda x, d, b: apa_fast.loss(x, d["labels"], d["aux"], d["adv"], d["mask"], lam=0.5, temperature=0.9,
                                           ignore_index=IGNORE, backend=b),
     lambda x, d: _loss64("apa", *_logp64(x, d, 0.9), d, lam=0.5)),
    ("ppo_loss", lambda x, d, b: apa_fast.ppo_loss(x, d["labels"], d["aux"], d["adv"], d["mask"], normalizer=7.0,
                                                   ignore_index=IGNORE, backend=b),
     lambda x, d: _loss64("ppo", *_logp64(x, d, 1.0), d, normalizer=7.0, clip_eps=0.2)),
    ("awr_loss", lambda x, d, b: apa_fast.awr_loss(x, d["labels"], d["adv"], d["mask"], lam=2.0, reduction="sum",
                                                   ignore_index=IGNORE, backend=b),
     lambda x, d: _loss64("awr", *_logp64(x, d, 1.0), d, reduction="sum", lam=2.0, max_weight=20.0)),
    ("loss-none", lambda x, d, b: apa_fast.loss(x, d["labels"], d["aux"], d["adv"], d["mask"], reduction="none",
                                                ignore_index=IGNORE, backend=b),
     lambda x, d: _loss64("apa", *_logp64(x, d, 1.0), d, reduction="none", lam=1.0)),
    ("logprobs", lambda x, d, b: apa_fast.logprobs(x, d["labels"], temperature=1.3, ignore_index=IGNORE, backend=b),
     lambda x, d: _logp64(x, d, 1.3, use_mask=False)[0]),
]


def _linear64(h, w, b, d, *, kind, temperature=0.9, scale=1.5, softcap=4.0, reduction="mean"):
    z = scale * (h @ w.T + (0.0 if b is None else b))
    z = softcap * torch.tanh(z / softcap) if softcap else z
    logp, counted = _logp64(z, d, temperature, use_mask=kind != "logprobs")
    return logp if kind == "logprobs" else _loss64("apa", logp, counted, d, reduction=reduction, lam=0.5)


# (name, op(h, w, b, d, backend), reference(h, w, b, d), bias?); chunk_size=2 sweeps several chunks.
LINEAR_OPS = [
    ("linear_loss", lambda h, w, b, d, be: apa_fast.linear_loss(
        h, w, d["labels"], d["aux"], d["adv"], d["mask"], bias=b, lam=0.5, temperature=0.9, logit_scale=1.5,
        logit_softcap=4.0, ignore_index=IGNORE, chunk_size=2, backend=be),
     lambda h, w, b, d: _linear64(h, w, b, d, kind="apa"), True),
    ("linear_loss-none", lambda h, w, b, d, be: apa_fast.linear_loss(
        h, w, d["labels"], d["aux"], d["adv"], d["mask"], lam=0.5, temperature=0.9, ignore_index=IGNORE,
        reduction="none", chunk_size=3, backend=be),
     lambda h, w, b, d: _linear64(h, w, None, d, kind="apa", scale=1.0, softcap=None, reduction="none"), False),
    ("linear_logprobs", lambda h, w, b, d, be: apa_fast.linear_logprobs(
        h, w, d["labels"], bias=b, temperature=0.9, logit_scale=1.5, logit_softcap=4.0, ignore_index=IGNORE,
        chunk_size=4, backend=be),
     lambda h, w, b, d: _linear64(h, w, b, d, kind="logprobs"), True),
]


def _close(actual, expected, what, tol=TOL, scale=0.0):
    assert actual.dtype == torch.float32 or actual.dtype == expected.dtype == torch.float32, what
    assert_close_rel(actual, expected, tol, what, scale=scale)


def _terms_scale(f64, primals64, tangents64):
    """The magnitude of the terms a tangent sums, ``|| sum_i |J_i| |t_i| ||``: each term carries its own float32
    rounding, so a tangent whose terms cancel is accurate relative to them, not to itself."""
    jacobians = torch.func.jacrev(f64, argnums=tuple(range(len(primals64))))(*primals64)
    total = 0.0
    for jacobian, tangent in zip(jacobians, tangents64, strict=True):
        total = total + (jacobian.abs() * tangent.abs()).flatten(jacobian.dim() - tangent.dim()).sum(-1)
    return total.norm().item()


def _ids(v):
    return v if isinstance(v, str) else ""


# ----------------------------------------------------------------------------------------------------
# Class: forward mode and torch.func give the float64 answer (they gave 0, None or PyTorch's setup_context error).
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op, ref", LOGITS_OPS, ids=_ids)
def test_logits_ops_under_forward_mode_and_torch_func(backend, design, name, op, ref):
    x, d = _token_data((2, 3), 11)
    tangent = torch.randn_like(x)
    f = lambda x: op(x, d, backend)  # noqa: E731
    f64 = lambda x: ref(x, d)  # noqa: E731
    x64, t64 = x.double(), tangent.double()
    value, want_tangent = torch.func.jvp(f64, (x64,), (t64,))
    got_value, got_tangent = torch.func.jvp(f, (x,), (tangent,))
    _close(got_value, value, f"{name} jvp primal")
    scale = _terms_scale(f64, (x64,), (t64,))
    _close(got_tangent, want_tangent, f"{name} torch.func.jvp tangent", scale=scale)
    with fwAD.dual_level():
        dual_out = f(fwAD.make_dual(x, tangent))
        _close(fwAD.unpack_dual(dual_out).tangent, want_tangent, f"{name} forward_ad tangent", scale=scale)
    want_jacobian = torch.func.jacrev(f64)(x64)
    _close(torch.func.jacrev(f)(x), want_jacobian, f"{name} jacrev")
    _close(torch.func.jacfwd(f)(x), want_jacobian, f"{name} jacfwd")
    if value.dim() == 0:
        _close(torch.func.grad(f)(x), want_jacobian, f"{name} torch.func.grad")
    cotangent = torch.randn(value.shape)
    _, vjp_fn = torch.func.vjp(f, x)
    _close(vjp_fn(cotangent)[0], torch.func.vjp(f64, x64)[1](cotangent.double())[0], f"{name} vjp")
    batch = torch.stack([x, 2.0 * x.flip(-1)])
    _close(torch.func.vmap(f)(batch), torch.stack([f64(b) for b in batch.double()]), f"{name} vmap")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op, ref", LOGITS_OPS[:1] + LOGITS_OPS[-1:], ids=_ids)
def test_forward_and_reverse_mode_in_one_call(backend, design, name, op, ref):
    """A dual tensor that also requires grad: the tangent and the gradient, each the float64 one."""
    x, d = _token_data((3, 2), 13)
    tangent, weights = torch.randn_like(x), torch.randn(3, 2)
    leaf = x.clone().requires_grad_()
    with fwAD.dual_level():
        out = op(fwAD.make_dual(leaf, tangent), d, backend)
        got_tangent = fwAD.unpack_dual(out).tangent
    (out * weights).sum().backward()
    want_value, want_tangent = torch.func.jvp(lambda x: ref(x, d), (x.double(),), (tangent.double(),))
    want_grad = torch.func.grad(lambda x: (ref(x, d) * weights.double()).sum())(x.double())
    scale = _terms_scale(lambda x: ref(x, d), (x.double(),), (tangent.double(),))
    _close(got_tangent, want_tangent, f"{name} tangent", scale=scale)
    _close(leaf.grad, want_grad, f"{name} grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op, ref, with_bias", LINEAR_OPS, ids=_ids)
def test_linear_ops_under_forward_mode_and_torch_func(backend, name, op, ref, with_bias):
    _, d = _token_data((2, 3), 9)
    hidden, weight = torch.randn(2, 3, 5), torch.randn(9, 5) / 2
    bias = torch.randn(9) if with_bias else None
    primals = (hidden, weight) + ((bias,) if with_bias else ())
    f = lambda h, w, b=None: op(h, w, b, d, backend)  # noqa: E731
    f64 = lambda h, w, b=None: ref(h, w, b, d)  # noqa: E731
    primals64 = tuple(p.double() for p in primals)
    tangents = tuple(torch.randn_like(p) for p in primals)
    value, want_tangent = torch.func.jvp(f64, primals64, tuple(t.double() for t in tangents))
    got_value, got_tangent = torch.func.jvp(f, primals, tangents)
    _close(got_value, value, f"{name} jvp primal")
    tangents64 = tuple(t.double() for t in tangents)
    _close(got_tangent, want_tangent, f"{name} torch.func.jvp tangent (all inputs)",
           scale=_terms_scale(f64, primals64, tangents64))
    for i, what in enumerate(("hidden", "weight", "bias")[:len(primals)]):
        one = tuple(t if j == i else torch.zeros_like(t) for j, t in enumerate(tangents))
        want_one = torch.func.jvp(f64, primals64, tuple(t.double() for t in one))[1]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if j == i else p for j, (p, t) in enumerate(zip(primals, one, strict=True))]
            _close(fwAD.unpack_dual(f(*duals)).tangent, want_one, f"{name} forward_ad tangent of {what}",
                   scale=_terms_scale(f64, primals64, tuple(t.double() for t in one)))
    argnums = tuple(range(len(primals)))
    want_jacobians = torch.func.jacrev(f64, argnums=argnums)(*primals64)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        for got, want in zip(transform(f, argnums=argnums)(*primals), want_jacobians, strict=True):
            _close(got, want, f"{name} {transform.__name__}")
    if value.dim() == 0:
        for got, want in zip(torch.func.grad(f, argnums=argnums)(*primals), want_jacobians, strict=True):
            _close(got, want, f"{name} torch.func.grad")
    batch = torch.stack([hidden, -hidden.flip(-1)])
    _close(torch.func.vmap(f, in_dims=(0,) + (None,) * (len(primals) - 1))(batch, *primals[1:]),
           torch.stack([f64(h, *primals64[1:]) for h in batch.double()]), f"{name} vmap over hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_entropy_output_has_the_float64_tangent(backend, linear):
    """``return_entropy=True``: the entropy's forward-mode tangent (and the log-prob's beside it), logits and linear
    ops, against float64 (0 where the token does not count)."""
    _, d = _token_data((2, 3), 11)
    counted = d["labels"] != IGNORE
    hidden, weight = torch.randn(2, 3, 5), torch.randn(11, 5) / 2
    x = hidden if linear else torch.randn(2, 3, 11) * 3

    def f(x):
        if linear:
            return apa_fast.linear_logprobs(x, weight, d["labels"], temperature=0.9, ignore_index=IGNORE, chunk_size=2,
                                            backend=backend, return_entropy=True)
        return apa_fast.logprobs(x, d["labels"], temperature=0.9, ignore_index=IGNORE, backend=backend,
                                 return_entropy=True)

    def f64(x):
        z = (x @ weight.double().T if linear else x) / 0.9
        logp = torch.log_softmax(z, -1).gather(-1, torch.where(counted, d["labels"], 0)[..., None])[..., 0]
        return torch.where(counted, logp, 0.0), torch.where(counted, entropy64(z), 0.0)

    tangent = torch.randn_like(x)
    (want_logp, want_entropy), (want_logp_dt, want_entropy_dt) = torch.func.jvp(f64, (x.double(),),
                                                                                 (tangent.double(),))
    (logp, entropy), (logp_dt, entropy_dt) = torch.func.jvp(f, (x,), (tangent,))
    _close(entropy, want_entropy, "entropy")
    scale_logp = _terms_scale(lambda x: f64(x)[0], (x.double(),), (tangent.double(),))
    scale_entropy = _terms_scale(lambda x: f64(x)[1], (x.double(),), (tangent.double(),))
    _close(logp_dt, want_logp_dt, "log-prob tangent", scale=scale_logp)
    _close(entropy_dt, want_entropy_dt, "entropy tangent", scale=scale_entropy)


def _second_order_cases():
    """(name, f(x, d, backend) -> scalar, x's shape, designs): x is the logits, or the hidden states of a linear
    op (which has one design)."""
    for name, op, _ in LOGITS_OPS:
        for design in ("0", "1"):
            yield name, lambda x, d, b, op=op: op(x, d, b).sum(), (2, 3, 9), design
    weight = torch.randn(9, 5)
    for name, op, _, _ in LINEAR_OPS:
        yield name, lambda x, d, b, op=op: op(x, weight, None, d, b).sum(), (2, 3, 5), "auto"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, f, shape, design", list(_second_order_cases()), ids=_ids)
@pytest.mark.parametrize("transform", ["hessian", "jacrev(jacrev)", "jacfwd(grad)"])
def test_second_order_raises_the_differentiable_once_error(backend, name, f, shape, design, transform, monkeypatch):
    """Forward over reverse (hessian) gave zeros, and so did reverse over reverse in training mode; every second
    order is now one clear error."""
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", design)
    _, d = _token_data((2, 3), 9)
    second = {"hessian": torch.func.hessian, "jacrev(jacrev)": lambda g: torch.func.jacrev(torch.func.jacrev(g)),
              "jacfwd(grad)": lambda g: torch.func.jacfwd(torch.func.grad(g))}[transform]
    with pytest.raises(RuntimeError, match="differentiable once"):
        second(lambda x: f(x, d, backend))(torch.randn(shape))


# ----------------------------------------------------------------------------------------------------
# Class: inplace_backward=True never writes into a leaf's memory (it wrote the gradient over an nn.Parameter).
# ----------------------------------------------------------------------------------------------------
def _logits_losses():
    yield "loss", lambda x, d, b, **kw: apa_fast.loss(x, d["labels"], d["aux"], d["adv"], d["mask"],
                                                      ignore_index=IGNORE, backend=b, inplace_backward=True, **kw)
    yield "ppo_loss", lambda x, d, b, **kw: apa_fast.ppo_loss(x, d["labels"], d["aux"], d["adv"], d["mask"],
                                                              ignore_index=IGNORE, backend=b, inplace_backward=True,
                                                              **kw)
    yield "awr_loss", lambda x, d, b, **kw: apa_fast.awr_loss(x, d["labels"], d["adv"], d["mask"],
                                                              ignore_index=IGNORE, backend=b, inplace_backward=True,
                                                              **kw)


def _reference_grad(op, x, d, backend, upstream=None):
    """The gradient without in-place writing (the same op on a copy): what every in-place case must equal."""
    copy = x.detach().clone().requires_grad_()
    out = op(copy, d, backend) if upstream is None else op(copy, d, backend, reduction="none")
    out.backward(upstream)
    return copy.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op", list(_logits_losses()), ids=_ids)
@pytest.mark.parametrize("layout", ["parameter", "view of a parameter", "view of a leaf made to require grad"])
def test_inplace_backward_leaves_a_leaf_untouched(backend, design, name, op, layout):
    logits, d = _token_data((2, 4), 17)
    if layout == "parameter":
        owner = torch.nn.Parameter(logits[:, :3].clone())
        x = owner
    elif layout == "view of a parameter":
        owner = torch.nn.Parameter(logits.clone())
        x = owner[:, :3]  # the causal-LM slice logits[:, :-1]
    else:
        owner = logits.clone()
        x = owner[:, :3].requires_grad_()  # a leaf view of a tensor that does not require grad
    d = {k: v[:, :3] for k, v in d.items()}
    before = owner.detach().clone()
    want = _reference_grad(op, x, d, backend)
    op(x, d, backend).backward()
    assert torch.equal(owner.detach(), before), f"{name}: the leaf's memory was overwritten"
    grad = x.grad if x.is_leaf else owner.grad[:, :3]
    _close(grad, want, f"{name} grad")
    assert grad.untyped_storage().data_ptr() != owner.untyped_storage().data_ptr()
    if layout == "parameter":
        # The reproducer: an SGD step moved the parameter by its own size.
        torch.optim.SGD([owner], lr=0.1).step()
        _close(owner.detach(), before - 0.1 * want, f"{name} SGD step")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op", list(_logits_losses()), ids=_ids)
def test_inplace_backward_still_writes_into_a_non_leaf(backend, design, name, op):
    """The control: a model's logits (a non-leaf) receive the gradient in place, per-token upstream included."""
    logits, d = _token_data((3, 5), 23)
    leaf = logits.clone().requires_grad_()
    x = leaf.clone()
    upstream = torch.randn(5, 3).T  # per-token, non-contiguous
    want = _reference_grad(op, x, d, backend, upstream)
    op(x, d, backend, reduction="none").backward(upstream)
    _close(x.detach(), want, f"{name}: the gradient written over the logits")
    _close(leaf.grad, want, f"{name} grad")


# ----------------------------------------------------------------------------------------------------
# Class: a retained graph's second backward reads the saved gradient unchanged (training mode handed it out).
# ----------------------------------------------------------------------------------------------------
def _scalar_ops():
    yield "loss-mean", lambda x, d, b: apa_fast.loss(x, d["labels"], d["aux"], d["adv"], d["mask"],
                                                     ignore_index=IGNORE, backend=b)
    yield "ppo_loss-sum", lambda x, d, b: apa_fast.ppo_loss(x, d["labels"], d["aux"], d["adv"], d["mask"],
                                                            reduction="sum", ignore_index=IGNORE, backend=b)
    yield "awr_loss-normalizer", lambda x, d, b: apa_fast.awr_loss(x, d["labels"], d["adv"], d["mask"],
                                                                   normalizer=5.0, ignore_index=IGNORE, backend=b)
    yield "logprobs-weighted", lambda x, d, b: (apa_fast.logprobs(x, d["labels"], ignore_index=IGNORE, backend=b)
                                                * d["weights"]).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op", list(_scalar_ops()), ids=_ids)
def test_retained_graph_grad_edited_in_place(backend, design, name, op):
    logits, d = _token_data((2, 3), 13)
    want = _reference_grad(op, logits, d, backend)
    x = logits.clone().requires_grad_()
    out = op(x, d, backend)
    first, = torch.autograd.grad(out, x, retain_graph=True)
    _close(first, want, f"{name} first grad")
    first.mul_(2)  # the reproducer: the next call raised "modified by an inplace operation"
    second, = torch.autograd.grad(out, x, retain_graph=True)
    _close(second, want, f"{name} second grad")
    second.zero_()
    batched, = torch.autograd.grad(out, x, grad_outputs=torch.tensor([1.0, -0.5]), is_grads_batched=True,
                                   retain_graph=True)
    _close(batched, torch.stack([want, -0.5 * want]), f"{name} batched upstream (vmap over the backward)")
    third, = torch.autograd.grad(out, x, grad_outputs=torch.tensor(-0.5))
    _close(third, -0.5 * want, f"{name} third grad, upstream -0.5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_linear_loss_grads_edited_in_place(backend):
    """linear_loss precomputes its hidden/weight/bias gradients the same way."""
    _, d = _token_data((2, 3), 9)
    leaves = [torch.randn(2, 3, 5, requires_grad=True), (torch.randn(9, 5) / 2).requires_grad_(),
              torch.randn(9, requires_grad=True)]
    f = LINEAR_OPS[0][1]
    want = torch.func.grad(lambda *p: LINEAR_OPS[0][2](*p, d), argnums=(0, 1, 2))(*(t.double() for t in leaves))
    out = f(*leaves, d, backend)
    for round_ in range(3):
        grads = torch.autograd.grad(out, leaves, retain_graph=round_ < 2)
        for what, got, expected in zip(("hidden", "weight", "bias"), grads, want, strict=True):
            _close(got, expected, f"linear_loss {what} grad, round {round_}")
            got.mul_(3)


class _LargeAllocations(TorchDispatchMode):
    """Counts aten calls whose output has at least ``numel`` elements (logits-sized copies)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.calls = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.calls.append(str(func))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_mode_writes_for_the_last_upstream_gradient(backend, dtype, monkeypatch):
    """The forward writes the gradient for the upstream gradient the previous backward got (``loss / steps``):
    the backward then hands it over untouched, with no logits-sized tensor, and only a change of the upstream
    gradient rescales it, into a new one (float16, whose range a stale guess could overflow, always writes for 1).
    Every step's gradient is float64's times its factor."""
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", "1")
    assert logprob.UPSTREAM_GUESS.value == 1.0  # tests/conftest.py: as in a fresh process
    logits, d = _token_data((2, 3), 13)
    logits = logits.to(dtype)
    op, ref = LOGITS_OPS[0][1], LOGITS_OPS[0][2]
    want = torch.func.grad(lambda z: ref(z, d))(logits.double())
    tol = TOL if dtype == torch.float32 else 1e-2  # the gradient is stored in the logits' dtype
    guess, grads = 1.0, {}
    for factor in (0.25, 0.25, -3.0, 0.25, 1.0, 1.0, 0.125, -0.125):
        x = logits.clone().requires_grad_()
        out = op(x, d, backend) * factor
        with _LargeAllocations(logits.numel()) as spy:
            out.backward()
        rescaled = factor != (1.0 if dtype == torch.float16 else guess)
        assert [call.split(".")[1] for call in spy.calls] == (["mul"] if rescaled else []), (factor, guess, spy.calls)
        assert_close_rel(x.grad, factor * want, tol, f"grad at upstream {factor} after {guess}")
        # Bitwise the same whether the guess held or not: only powers of two become the guess.
        assert torch.equal(grads.setdefault(factor, x.grad), x.grad), (factor, guess)
        guess = factor if abs(factor) in (0.125, 0.25, 1.0) else guess
    assert logprob.UPSTREAM_GUESS.value == -0.125  # recorded for float16 too; its forward writes for 1
    # A batched upstream gradient (vmap over the backward, graph freed after it) has no one value: multiplied.
    x = logits.clone().requires_grad_()
    batched, = torch.autograd.grad(op(x, d, backend), x, grad_outputs=torch.tensor([0.125, -2.0]),
                                   is_grads_batched=True)
    assert_close_rel(batched, torch.stack([0.125 * want, -2.0 * want]), tol, "batched upstream gradients")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_backward_still_hands_out_the_saved_gradient(backend, monkeypatch):
    """Training mode's point: ``loss.backward()`` makes no logits-sized tensor; a retained graph makes exactly one
    (the copy that keeps the saved gradient safe; AccumulateGrad copied before, so the count is unchanged)."""
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", "1")
    logits, d = _token_data((2, 3), 13)
    op = LOGITS_OPS[0][1]
    want = _reference_grad(lambda x, d, b: op(x, d, b), logits, d, backend)
    for retain, copies in ((False, 0), (True, 1)):
        x = logits.clone().requires_grad_()
        out = op(x, d, backend)
        with _LargeAllocations(logits.numel()) as spy:
            out.backward(retain_graph=retain)
        assert len(spy.calls) == copies, (retain, spy.calls)
        _close(x.grad, want, f"grad, retain_graph={retain}")

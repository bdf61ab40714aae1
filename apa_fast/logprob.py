"""The public log-prob ops: `apa_fast.loss`, `logprobs`, `ppo_loss`, `awr_loss`, `apa_loss_from_logprobs`.

All four logits ops are one kernel family (``apa_fast.kernels.logprob`` on CUDA, ``apa_fast.torch_backend``
elsewhere) selected by a loss kind of the registry (``apa_fast.kinds``). The forward computes, per token row,
the log-softmax of the sampled token with an online log-sum-exp, and the kind's epilogue; the gradient is
written in one pass over the logits. Neither materialises a float32 ``[tokens x vocab]`` tensor.

Two designs of the gradient, the same numbers:

* two kernels (inference, ``reduction="none"``, ``inplace_backward=True``): the forward saves the log-sum-exp,
  the backward re-reads the logits and writes ``dlogits``;
* training mode (the logits need a gradient and the loss is reduced to a scalar): one pass computes the loss
  and writes ``dlogits`` while the row is on chip; the backward returns it, scaled by the upstream gradient.
  ``APA_FAST_FUSED_GRAD=0`` / ``=1`` forces the two-kernel / training-mode design (default ``auto``: training
  mode on the Triton backend, two kernels on the torch backend).

The kernels are registered as ``torch.library`` custom ops (``apa_fast::logprob_forward``, ``..._backward``,
``..._loss_and_grad``, and the value checks of ``apa_fast::token_labels``), with fake kernels and autograd
formulas, so every op runs under ``torch.compile(fullgraph=True)`` without a graph break.

Equivalent PyTorch code (what `apa_fast.reference.apa_loss` does, with a float32 ``[N x V]`` copy)::

    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]
    r = logp - ref_logprobs - advantages / lam
    loss = (r ** 2)[counted].mean()        # counted: label != ignore_index and mask
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _dispatch, torch_backend
from .kinds import APA, AWR, LOGPROB, PPO, LossKind
from .rows import as_rows3d, denominator, needs_copy, reduce_rows, writable_in_place
from .validation import (
    check_float_rows,
    check_positive,
    check_reduction,
    check_temperature,
    per_token_floats,
    token_labels,
)

FUSED_GRAD_MODES = ("auto", "0", "1")


# ----------------------------------------------------------------------------------------------------
# Implementations and the design switch.
# ----------------------------------------------------------------------------------------------------
def implementation(backend: str):
    """The module holding ``forward``, ``backward`` and ``forward_grad`` for a resolved backend."""
    if backend == "triton":
        from .kernels import logprob as kernels  # triton imports only when the fused kernels run

        return kernels
    return torch_backend


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fused_grad_wanted(backend: str) -> bool:
    """Whether training mode runs where it applies: ``APA_FAST_FUSED_GRAD`` (auto, 0, 1), read at call time."""
    mode = os.environ.get("APA_FAST_FUSED_GRAD", "auto") or "auto"
    if mode not in FUSED_GRAD_MODES:
        raise ValueError(f"APA_FAST_FUSED_GRAD must be one of {FUSED_GRAD_MODES}, got {mode!r}")
    # auto: the Triton kernel reads each row from DRAM once; on CPUs the torch backend's two passes measured faster.
    return backend == "triton" if mode == "auto" else mode == "1"


# ----------------------------------------------------------------------------------------------------
# Custom ops. Per-token tensors are flat float32/int32 (rows,); labels < 0 mark rows that do not count.
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("apa_fast::logprob_forward", mutates_args=())
def _forward_op(logits: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor, adv: torch.Tensor, kind: int,
                inv_temperature: float, param0: float, param1: float, backend: str,
                inplace_backward: bool) -> torch.Tensor:
    """float32 ``(4, rows)``: logp, lse, loss, dlogp. ``inplace_backward`` is read by the backward only."""
    with device_guard(logits.device):
        return torch.stack(implementation(backend).forward(
            as_rows3d(logits), labels, aux, adv, loss_kind=kind, inv_temperature=inv_temperature, param0=param0,
            param1=param1))


@_forward_op.register_fake
def _(logits, labels, aux, adv, kind, inv_temperature, param0, param1, backend, inplace_backward):
    return labels.new_empty((4, labels.shape[0]), dtype=torch.float32)


@torch.library.custom_op("apa_fast::logprob_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, row_grad: torch.Tensor,
                 inv_temperature: float, backend: str) -> torch.Tensor:
    """``dlogits`` of ``sum(row_grad * logp)``, a new tensor of the logits' shape and dtype (contiguous)."""
    rows3d = as_rows3d(logits)
    out3d = torch.empty(rows3d.shape, dtype=logits.dtype, device=logits.device)
    with device_guard(logits.device):
        implementation(backend).backward(rows3d, labels, lse, row_grad, out3d, inv_temperature=inv_temperature)
    # Rows enumerate the leading dimensions in order, so the contiguous buffer views back as logits.shape.
    return out3d.view(logits.shape)


@_backward_op.register_fake
def _(logits, labels, lse, row_grad, inv_temperature, backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("apa_fast::logprob_backward_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, row_grad: torch.Tensor,
                         inv_temperature: float, backend: str) -> None:
    """`_backward_op` written over ``logits`` (which must not overlap itself nor need a copy to be read)."""
    rows3d = as_rows3d(logits)
    with device_guard(logits.device):
        implementation(backend).backward(rows3d, labels, lse, row_grad, rows3d, inv_temperature=inv_temperature)


@torch.library.custom_op("apa_fast::logprob_loss_and_grad", mutates_args=())
def _loss_and_grad_op(logits: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor, adv: torch.Tensor,
                      denom: torch.Tensor | None, kind: int, inv_temperature: float, param0: float, param1: float,
                      reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training mode: (the reduced float32 loss, its gradient with respect to ``logits``) in one pass."""
    rows3d = as_rows3d(logits)
    out3d = torch.empty(rows3d.shape, dtype=logits.dtype, device=logits.device)
    row_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    row_scale = row_scale / denom if reduction == "mean" else row_scale
    with device_guard(logits.device):
        _, _, loss, _ = implementation(backend).forward_grad(
            rows3d, labels, aux, adv, out3d, row_scale, loss_kind=kind, inv_temperature=inv_temperature,
            param0=param0, param1=param1)
    return reduce_rows(reduction, loss, denom, ()), out3d.view(logits.shape)


@_loss_and_grad_op.register_fake
def _(logits, labels, aux, adv, denom, kind, inv_temperature, param0, param1, reduction, backend):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape)


# ----------------------------------------------------------------------------------------------------
# Autograd formulas. The ops are differentiable once; differentiating a gradient raises.
# ----------------------------------------------------------------------------------------------------
def _setup_forward(ctx, inputs, output):
    logits, labels, _, _, _, inv_temperature, _, _, backend, inplace_backward = inputs
    ctx.save_for_backward(logits, labels, output[1], output[3])
    ctx.inv_temperature, ctx.backend, ctx.inplace_backward = inv_temperature, backend, inplace_backward


def _forward_backward(ctx, grad_stats):
    logits, labels, lse, dlogp = ctx.saved_tensors
    # Only logp (row 0) and loss (row 2) are outputs of the public ops; lse and dlogp are not differentiated.
    # Rows that do not count output a constant 0: whatever upstream gradient they get (inf, NaN) is dropped.
    row_grad = torch.where(labels >= 0, grad_stats[2] * dlogp + grad_stats[0], 0.0)
    if ctx.inplace_backward and not torch.compiler.is_compiling():
        # The logits buffer receives its own gradient: declared as a mutation (it bumps the version counter, so a
        # later reader of the saved logits fails loudly instead of reading the gradient).
        target = logits.detach()
        _backward_inplace_op(target, labels, lse, row_grad, ctx.inv_temperature, ctx.backend)
        return target, None, None, None, None, None, None, None, None, None
    return (_backward_op(logits, labels, lse, row_grad, ctx.inv_temperature, ctx.backend),
            None, None, None, None, None, None, None, None, None)


def _setup_loss_and_grad(ctx, inputs, output):
    # The gradient output is never differentiated: no logits-sized zeros materialised for it in the backward.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _loss_and_grad_backward(ctx, grad_output, grad_grad):
    (grad,) = ctx.saved_tensors
    return differentiable_once(scaled(grad, grad_output)), None, None, None, None, None, None, None, None, None, None


def scaled(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad * factor`` for a gradient precomputed in the forward. In eager mode, when ``factor`` is exactly 1
    (what ``loss.backward()`` passes), ``grad`` itself: no second logits-sized tensor, at the cost of one scalar
    sync. Traced graphs (torch.compile, fake tensors) always multiply: the check would depend on data."""
    if torch.compiler.is_compiling() or is_fake(factor) or not bool(factor == 1):
        return grad * factor.to(grad.dtype)
    return grad


def differentiable_once(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` itself; under ``create_graph=True``, a copy whose own gradient raises (a precomputed gradient
    carries no graph, so a penalty built on it would otherwise be silently constant)."""
    if not torch.is_grad_enabled():
        return grad
    # The anchor requires grad so that the copy is part of the graph and its backward (which raises) is reached.
    return _once_op(grad, torch.zeros((), device=grad.device, requires_grad=True))


@torch.library.custom_op("apa_fast::differentiable_once", mutates_args=())
def _once_op(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return grad.clone()


@_once_op.register_fake
def _(grad, anchor):
    return torch.empty_like(grad)


def not_twice_differentiable(*_):
    raise RuntimeError("apa_fast ops are differentiable once: the gradient of their gradient (double backward, "
                       "e.g. a gradient penalty through torch.autograd.grad(create_graph=True)) is not supported")


torch.library.register_autograd("apa_fast::logprob_forward", _forward_backward, setup_context=_setup_forward)
torch.library.register_autograd("apa_fast::logprob_loss_and_grad", _loss_and_grad_backward,
                                setup_context=_setup_loss_and_grad)
for _name in ("apa_fast::logprob_backward", "apa_fast::differentiable_once"):
    torch.library.register_autograd(_name, not_twice_differentiable, setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------------------------
# Validation and dispatch shared by the four logits ops.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """What the logits ops and the linear ops pass their kernels, once every argument is checked.

    ``labels``: int32 ``(rows,)``, -1 where the row does not count; ``aux``/``adv``: float32 ``(rows,)`` (empty
    when the kind reads none); ``backend``: resolved; ``param0``/``param1``: the kind's kernel slots;
    ``reduction``: the one applied ("none" for log-probs); ``denom``: what a "mean" divides by, else None.
    """

    labels: torch.Tensor
    aux: torch.Tensor
    adv: torch.Tensor
    backend: str
    param0: float
    param1: float
    reduction: str
    denom: torch.Tensor | None


def token_inputs(kind: LossKind, labels, aux, adv, mask, *, rows_shape, vocab, device, anchor, temperature,
                 ignore_index, reduction, normalizer, hyper, backend) -> TokenInputs:
    """Check everything but the logits (or hidden states) whose leading dimensions are ``rows_shape``, and
    resolve the backend. ``aux``/``adv`` are None when ``kind`` does not read them."""
    check_temperature(temperature)
    for name, value in hyper.items():
        check_positive(name, value)
    normalizer = check_reduction(reduction, normalizer, device)
    labels32 = token_labels(labels, mask, ignore_index, rows_shape=rows_shape, vocab=vocab, device=device,
                            anchor=anchor, normalizer=normalizer)
    empty = torch.empty(0, dtype=torch.float32, device=device)
    aux32 = empty if aux is None else per_token_floats(kind.aux, aux, rows_shape, device, anchor)
    adv32 = empty if adv is None else per_token_floats("advantages", adv, rows_shape, device, anchor)
    reduction = "none" if kind is LOGPROB else reduction
    return TokenInputs(labels32, aux32, adv32, _dispatch.pick_loss_backend(backend, device),
                       *kind.kernel_params(**hyper), reduction,
                       denominator(reduction, (labels32 >= 0).sum(), normalizer))


def _fused(kind: LossKind, logits, labels, aux, adv, mask, *, temperature, ignore_index, reduction, backend,
           hyper=None, normalizer=None, inplace_backward=False):
    """Validate, dispatch, run. ``aux``/``adv`` are None when ``kind`` does not read them."""
    check_float_rows("logits", logits, "V")
    rows_shape = logits.shape[:-1]
    t = token_inputs(kind, labels, aux, adv, mask, rows_shape=rows_shape, vocab=logits.shape[-1],
                     device=logits.device, anchor="logits", temperature=temperature, ignore_index=ignore_index,
                     reduction=reduction, normalizer=normalizer, hyper=hyper or {}, backend=backend)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and (needs_copy(logits) or not writable_in_place(logits)):
        inplace_backward = False  # the gradient goes to a new buffer when it cannot land in the logits' own memory
    if needs_grad and t.reduction != "none" and not inplace_backward and fused_grad_wanted(t.backend):
        output, _ = _loss_and_grad_op(logits, t.labels, t.aux, t.adv, t.denom, kind.id, 1.0 / temperature, t.param0,
                                      t.param1, t.reduction, t.backend)
        return output
    # For log-probs the kinds' loss is logp itself (0 where the row does not count), in every backend.
    loss = _forward_op(logits, t.labels, t.aux, t.adv, kind.id, 1.0 / temperature, t.param0, t.param1, t.backend,
                       bool(inplace_backward))[2]
    return reduce_rows(t.reduction, loss, t.denom, rows_shape)


# ----------------------------------------------------------------------------------------------------
# Public functionals.
# ----------------------------------------------------------------------------------------------------
_COMMON_DOC = """
    Shapes and dtypes: ``logits (..., V)`` float32/bfloat16/float16, any strides, aligned with ``labels``
    (position i scores ``labels[i]``: pass ``logits[:, :-1]`` with ``input_ids[:, 1:]`` for a causal LM);
    ``labels (...)`` integer (int64, int32, int16, int8, uint8) in ``[0, V)`` or ``ignore_index`` where the
    token counts (anything where it does not); per-token float tensors ``(...)`` or broadcast from the leading
    dimensions (``(B,)`` or ``(B, 1)`` for ``(B, T)`` tokens: one value per sequence); ``mask (...)`` bool, or
    0/1 integers or floats: the response tokens. A token counts when its label is not ``ignore_index`` and its
    mask is set. ``reduction``: "mean" (over counted tokens, 0 when none count; with ``normalizer`` the sum
    divided by it), "sum", or "none" (a float32 ``(...)`` tensor, 0 where not counted). ``normalizer``: a number
    or 0-dim tensor, the token count of the whole batch when the loss of a micro-batch or rank is one part of
    it (gradient accumulation, data parallelism): the parts then add up to the global token mean. The result is
    float32. Gradients flow to ``logits`` only, in the logits' dtype; the ops are differentiable once.
    ``temperature`` in [1e-6, 1e6]. ``backend``: "auto" (Triton on CUDA, the chunked torch path on CPU),
    "triton" or "torch". ``inplace_backward=True`` writes the gradient into the logits buffer (saving one
    logits-sized allocation; the gradient goes to a new buffer when the logits' memory overlaps itself or had
    to be copied); use it only when nothing reads the logits after the loss."""


def loss(logits, labels, ref_logprobs, advantages, mask=None, *, lam=1.0, temperature=1.0, ignore_index=-100,
         reduction="mean", normalizer=None, backend="auto", inplace_backward=False):
    """APA loss: mean over counted tokens of ``(logp - ref_logprobs - advantages / lam) ** 2``.

    ``logp = log_softmax(logits / temperature)[label]``; ``ref_logprobs`` is log pi_init(label) of the
    frozen initial policy (computed at the same temperature); ``advantages`` are GAE advantages under the
    sampling policy.
    """
    return _fused(APA, logits, labels, ref_logprobs, advantages, mask, temperature=temperature,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, hyper={"lam": lam},
                  normalizer=normalizer, inplace_backward=inplace_backward)


def ppo_loss(logits, labels, old_logprobs, advantages, mask=None, *, clip_eps=0.2, temperature=1.0,
             ignore_index=-100, reduction="mean", normalizer=None, backend="auto", inplace_backward=False):
    """PPO clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))``.

    ``ratio = exp(logp - old_logprobs)`` with ``old_logprobs`` from the sampling policy.
    """
    return _fused(PPO, logits, labels, old_logprobs, advantages, mask, temperature=temperature,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, hyper={"clip_eps": clip_eps},
                  normalizer=normalizer, inplace_backward=inplace_backward)


def awr_loss(logits, labels, advantages, mask=None, *, lam=1.0, max_weight=20.0, temperature=1.0,
             ignore_index=-100, reduction="mean", normalizer=None, backend="auto", inplace_backward=False):
    """AWR: ``-min(exp(advantages / lam), max_weight) * logp`` (the weight is data, not differentiated)."""
    return _fused(AWR, logits, labels, None, advantages, mask, temperature=temperature, ignore_index=ignore_index,
                  reduction=reduction, backend=backend, hyper={"lam": lam, "max_weight": max_weight},
                  normalizer=normalizer, inplace_backward=inplace_backward)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, backend="auto"):
    """float32 ``(...)`` log-probabilities ``log_softmax(logits / temperature)[label]``, 0 at ignored positions.

    Differentiable through the same fused backward as the losses.
    """
    return _fused(LOGPROB, logits, labels, None, None, None, temperature=temperature, ignore_index=ignore_index,
                  reduction="none", backend=backend)


for _fn in (loss, ppo_loss, awr_loss, logprobs):
    _fn.__doc__ += _COMMON_DOC


def apa_loss_from_logprobs(logprobs, ref_logprobs, advantages, mask=None, *, lam=1.0, reduction="mean",
                           normalizer=None):
    """The APA loss on log-probs a framework already computed (verl, OpenRLHF): plain PyTorch, not fused.

    ``logprobs (...)`` float, the policy's token log-probs (differentiable); ``ref_logprobs`` and ``advantages``
    of its shape or broadcast from its leading dimensions; ``mask`` bool or 0/1 of its shape. Returns float32:
    the mean (or ``sum / normalizer``), the sum, or the ``(...)`` per-token terms (0 where masked out) of
    ``(logprobs - ref_logprobs - advantages / lam) ** 2``.
    """
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating-point torch.Tensor, got {getattr(logprobs, 'dtype', logprobs)}")
    check_positive("lam", lam)
    rows_shape, device = logprobs.shape, logprobs.device
    normalizer = check_reduction(reduction, normalizer, device)
    ref = per_token_floats("ref_logprobs", ref_logprobs, rows_shape, device, "logprobs").view(rows_shape)
    adv = per_token_floats("advantages", advantages, rows_shape, device, "logprobs").view(rows_shape)
    counted = torch.ones(rows_shape, dtype=torch.bool, device=device)
    if mask is not None or normalizer is not None:
        # The value checks of the mask and a tensor normalizer (one sync), as for the fused ops.
        labels = token_labels(torch.zeros(rows_shape, dtype=torch.int32, device=device), mask, -100,
                              rows_shape=rows_shape, vocab=1, device=device, anchor="logprobs", normalizer=normalizer)
        counted = (labels >= 0).view(rows_shape)
    # Masked before squaring: garbage (inf, NaN) at masked-out positions gets no gradient path at all.
    terms = torch.where(counted, logprobs.float() - ref - adv / lam, 0.0).square()
    return reduce_rows(reduction, terms.reshape(-1), denominator(reduction, counted.sum(), normalizer), rows_shape)

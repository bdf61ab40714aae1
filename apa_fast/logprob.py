"""The public log-prob ops: `apa_fast.loss`, `logprobs`, `ppo_loss`, `awr_loss`, `apa_loss_from_logprobs`.

All four logits ops are one kernel family (``apa_fast.kernels.logprob`` on CUDA, ``apa_fast.torch_backend``
elsewhere) selected by a loss kind of the registry (``apa_fast.kinds``). The forward computes, per token row,
the log-softmax of the sampled token with an online log-sum-exp, and the kind's epilogue; the gradient is
written in one pass over the logits. Neither materialises a float32 ``[tokens x vocab]`` tensor.

Two designs of the gradient, the same numbers:

* two kernels (inference, ``reduction="none"``, ``inplace_backward=True``): the forward saves the log-sum-exp,
  the backward re-reads the logits and writes ``dlogits``;
* training mode (the logits need a gradient and the loss is reduced to a scalar): one pass computes the loss
  and writes ``dlogits`` while the row is on chip, for the upstream gradient that the previous training-mode
  backward of this process received when that was a power of two (1 at first; ``1 / gradient_accumulation_steps``
  under DeepSpeed, say; a normalizer belongs in ``normalizer=``, inside the op):
  the backward returns it untouched when the upstream gradient is the same again, and rescales it (a new
  tensor) when it is not. ``APA_FAST_FUSED_GRAD=0`` / ``=1`` forces the two-kernel / training-mode design (default
  ``auto``: on the Triton backend the byte model's choice, training mode where its rows in flight stay in L2
  (``python -m apa_fast.info --design TOKENS V DTYPE`` says which runs); training mode on the torch backend,
  one softmax per chunk instead of two).

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
import math
import os

import torch
from torch._C._functorch import is_functorch_wrapped_tensor, is_legacy_batchedtensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad

from . import _dispatch, torch_backend
from .kinds import APA, AWR, ENTROPY_COEF, HYPER_RANGES, LOGPROB, PPO, LossKind
from .rows import as_rows3d, denominator, gradient_buffer, needs_copy, reduce_rows, writable_in_place
from .validation import (
    TEMPERATURE,
    check_float_rows,
    check_number,
    check_reduction,
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


def fused_grad_wanted(backend: str, logits: torch.Tensor) -> bool:
    """Whether training mode runs where it applies: ``APA_FAST_FUSED_GRAD`` (auto, 0, 1), read at call time.

    auto: on Triton, the byte model's choice for the logits' row size and the device's SMs and L2
    (`apa_fast.kernels.logprob.training_mode_pays`: training mode where its rows in flight stay in L2); on the
    torch backend training mode (one fused softmax per chunk instead of two: 0.6-0.7x the two kernels' time on
    CPU at 1,024 x 32,000).
    """
    mode = os.environ.get("APA_FAST_FUSED_GRAD", "auto") or "auto"
    if mode not in FUSED_GRAD_MODES:
        raise ValueError(f"APA_FAST_FUSED_GRAD must be one of {FUSED_GRAD_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "1"
    if backend != "triton":
        return True
    kernels = implementation(backend)
    return kernels.training_mode_pays(logits.shape[-1] * logits.element_size(), *kernels.device_limits(logits.device))


# ----------------------------------------------------------------------------------------------------
# Custom ops. Per-token tensors are flat float32/int32 (rows,); labels < 0 mark rows that do not count.
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("apa_fast::logprob_forward", mutates_args=())
def _forward_op(logits: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor, adv: torch.Tensor, kind: int,
                inv_temperature: float, param0: float, param1: float, backend: str,
                inplace_backward: bool, entropy: bool = False) -> torch.Tensor:
    """float32 ``(4, rows)``: logp, lse, loss, dlogp; ``(5, rows)`` with the entropy fifth when ``entropy``.
    ``inplace_backward`` is read by the backward only."""
    with device_guard(logits.device):
        return torch.stack(implementation(backend).forward(
            as_rows3d(logits), labels, aux, adv, loss_kind=kind, inv_temperature=inv_temperature, param0=param0,
            param1=param1, entropy=entropy))


@_forward_op.register_fake
def _(logits, labels, aux, adv, kind, inv_temperature, param0, param1, backend, inplace_backward, entropy=False):
    return labels.new_empty((5 if entropy else 4, labels.shape[0]), dtype=torch.float32)


@torch.library.custom_op("apa_fast::logprob_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, row_grad: torch.Tensor,
                 inv_temperature: float, backend: str, entropy: torch.Tensor | None = None,
                 entropy_grad: torch.Tensor | None = None) -> torch.Tensor:
    """``dlogits`` of ``sum(row_grad * logp + entropy_grad * entropy)`` (the entropy term when both are given:
    the forward's entropy and its upstream gradient), a new tensor of the logits' shape and dtype (rows laid out
    as `gradient_buffer` lays them)."""
    rows3d = as_rows3d(logits)
    out3d = gradient_buffer(rows3d)
    with device_guard(logits.device):
        implementation(backend).backward(rows3d, labels, lse, row_grad, out3d, inv_temperature=inv_temperature,
                                         entropy=entropy, entropy_grad=entropy_grad)
    # Rows enumerate the leading dimensions in order, so the buffer views back as logits.shape.
    return out3d.view(logits.shape)


@_backward_op.register_fake
def _(logits, labels, lse, row_grad, inv_temperature, backend, entropy=None, entropy_grad=None):
    return gradient_buffer(as_rows3d(logits)).view(logits.shape)


@torch.library.custom_op("apa_fast::logprob_backward_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, row_grad: torch.Tensor,
                         inv_temperature: float, backend: str, entropy: torch.Tensor | None = None,
                         entropy_grad: torch.Tensor | None = None) -> None:
    """`_backward_op` written over ``logits`` (which must not overlap itself nor need a copy to be read)."""
    rows3d = as_rows3d(logits)
    with device_guard(logits.device):
        implementation(backend).backward(rows3d, labels, lse, row_grad, rows3d, inv_temperature=inv_temperature,
                                         entropy=entropy, entropy_grad=entropy_grad)


@torch.library.custom_op("apa_fast::logprob_loss_and_grad", mutates_args=())
def _loss_and_grad_op(logits: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor, adv: torch.Tensor,
                      denom: torch.Tensor | None, kind: int, inv_temperature: float, param0: float, param1: float,
                      reduction: str, backend: str, entropy_coef: float = 0.0, entropy: bool = False,
                      grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training mode: (the reduced float32 loss, its gradient with respect to ``logits`` for an upstream gradient
    of ``grad_scale``, the float32 ``(rows,)`` entropy) in one pass. With ``entropy`` the loss is the kind's minus
    ``entropy_coef`` times the same reduction of the entropy; without, the entropy output is empty."""
    rows3d = as_rows3d(logits)
    out3d = gradient_buffer(rows3d)
    row_scale = torch.full((), grad_scale, dtype=torch.float32, device=logits.device)
    row_scale = row_scale / denom if reduction == "mean" else row_scale
    with device_guard(logits.device):
        stats = implementation(backend).forward_grad(
            rows3d, labels, aux, adv, out3d, row_scale, loss_kind=kind, inv_temperature=inv_temperature,
            param0=param0, param1=param1, entropy=entropy, entropy_coef=entropy_coef)
    loss = reduce_rows(reduction, stats[2], denom, ())
    if not entropy:
        return loss, out3d.view(logits.shape), stats[0].new_empty(0)
    # A copy: a row of the kernels' (5, rows) buffer has a storage offset, which the fake kernel cannot know.
    return loss - entropy_coef * reduce_rows(reduction, stats[4], denom, ()), out3d.view(logits.shape), stats[4].clone()


@_loss_and_grad_op.register_fake
def _(logits, labels, aux, adv, denom, kind, inv_temperature, param0, param1, reduction, backend, entropy_coef=0.0,
      entropy=False, grad_scale=1.0):
    return (logits.new_empty((), dtype=torch.float32), gradient_buffer(as_rows3d(logits)).view(logits.shape),
            labels.new_empty((labels.shape[0] if entropy else 0,), dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------
# Autograd formulas. The ops are differentiable once; differentiating a gradient raises.
#
# Each formula is registered twice: on the custom op (reverse mode, what torch.compile traces) and, by
# `autograd_function`, on a torch.autograd.Function that the eager public ops call. Only the latter can carry
# what forward-mode AD and torch.func need (setup_context, jvp, a vmap rule): torch.library.register_autograd is
# reverse-only, a custom op silently drops forward tangents, and torch.func refuses its generated Function.
# ----------------------------------------------------------------------------------------------------
def autograd_function(op, backward, setup_context, jvp=None):
    """Register ``backward``/``setup_context`` on the custom op ``op`` and return the callable that runs ``op``
    with them: the op itself under torch.compile (Dynamo refuses an autograd.Function with a custom jvp) and on
    fake tensors, else an autograd.Function with the same formulas, ``jvp`` (None: PyTorch raises in forward
    mode) and a vmap rule generated from them (the op itself runs per sample under vmap)."""
    op.register_autograd(backward, setup_context=setup_context)
    body = {"forward": staticmethod(lambda *args: op(*args)), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward), "generate_vmap_rule": True}
    if jvp is not None:
        body["jvp"] = staticmethod(jvp)
    function = type(f"{op._name}_function", (torch.autograd.Function,), body)

    def run(*args):
        if torch.compiler.is_compiling() or any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return op(*args)
        return function.apply(*args)

    return run


def transformed(*tensors) -> bool:
    """Whether the ops run under forward-mode AD (a ``torch.autograd.forward_ad.dual_level``, ``torch.func.jvp``
    or ``jacfwd``, also nested) or torch.func (one of ``tensors`` is a wrapped stand-in). They then take the path
    whose every derivative is taken from saved inputs: two kernels, and the linear ops per token, reduced
    outside the op. Its tangent comes from the saved log-sum-exp and its second derivatives raise, where a
    gradient precomputed in the forward (training mode) carries no graph for an outer transform (``jacrev`` of
    ``jacrev`` would see a constant)."""
    if torch.compiler.is_compiling():
        return False
    return forward_ad._current_level >= 0 or any(t is not None and is_functorch_wrapped_tensor(t) for t in tensors)


def softmax_tangents(logits: torch.Tensor, tangent: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                     inv_temperature: float, entropy: torch.Tensor | None = None):
    """float32 ``(n,)`` tangents, for a tangent of ``logits (n, V)``, of ``logp = log_softmax(logits / T)[label]``,
    ``(tangent[label] - sum_v p_v tangent_v) / T``, and with ``entropy`` (the forward's ``H``, ``(n,)``) of
    ``H = -sum_v p_v log p_v``, ``-sum_v p_v (log p_v + H) tangent_v / T`` (else None). ``log p`` is rebuilt
    from the saved ``lse`` one float32 chunk of rows at a time, once for both (PyTorch ops on every backend,
    which torch.func's vmap batches); 0 where labels < 0."""
    step = max(1, torch_backend.TORCH_CHUNK_BYTES // (4 * logits.shape[-1]))
    means, entropy_sums = [lse[:0]], [lse[:0]]
    for start in range(0, logits.shape[0], step):
        rows = slice(start, start + step)
        logp = logits[rows].float() * inv_temperature - lse[rows, None]
        p_tangent = logp.exp() * tangent[rows].float()
        means.append(p_tangent.sum(-1))
        if entropy is not None:
            log_p = logp.clamp(min=torch_backend.LOGP_FLOOR)
            entropy_sums.append((p_tangent * (log_p + entropy[rows, None])).sum(-1))
    counted = labels >= 0
    target = tangent.gather(-1, torch.where(counted, labels, 0).long()[:, None])[:, 0].float()
    # Rows that do not count have lse 0 and any logits (p may be inf there): `where` keeps them out.
    logp_dt = torch.where(counted, (target - torch.cat(means)) * inv_temperature, 0.0)
    if entropy is None:
        return logp_dt, None
    return logp_dt, torch.where(counted, -torch.cat(entropy_sums) * inv_temperature, 0.0)


def _internal_tangent(like: torch.Tensor) -> torch.Tensor:
    """The tangent of the stats rows that no public output carries and the backward does not differentiate
    either (lse; dlogp, whose tangent is second order): NaN, so that a read would be loud, never a silent 0."""
    return torch.full_like(like, float("nan"))


def _setup_forward(ctx, inputs, output):
    logits, labels, _, _, _, inv_temperature, _, _, backend, inplace_backward, *_ = inputs
    # With the entropy (row 4) it is saved too: the backward's entropy term reads it.
    ctx.save_for_backward(logits, labels, output[1], output[3], *output[4:])
    ctx.save_for_forward(logits, labels, output[1], output[3], *output[4:])
    ctx.inv_temperature, ctx.backend, ctx.inplace_backward = inv_temperature, backend, inplace_backward
    ctx.num_inputs = len(inputs)  # the custom op sees its defaults, the autograd.Function only what was passed


def _forward_backward(ctx, grad_stats):
    logits, labels, lse, dlogp, *entropy = ctx.saved_tensors
    # Only logp (row 0), loss (row 2) and the entropy (row 4) are outputs of the public ops; lse and dlogp are not
    # differentiated. Rows that do not count output a constant 0: whatever upstream gradient they get (inf, NaN)
    # is dropped.
    counted = labels >= 0
    row_grad = torch.where(counted, grad_stats[2] * dlogp + grad_stats[0], 0.0)
    entropy_args = (entropy[0], torch.where(counted, grad_stats[4], 0.0)) if entropy else ()
    nones = (None,) * (ctx.num_inputs - 1)
    if ctx.inplace_backward and not torch.compiler.is_compiling():
        # The logits buffer receives its own gradient: declared as a mutation (it bumps the version counter, so a
        # later reader of the saved logits fails loudly instead of reading the gradient).
        target = logits.detach()
        _backward_inplace_op(target, labels, lse, row_grad, ctx.inv_temperature, ctx.backend, *entropy_args)
        return target, *nones
    return _backward(logits, labels, lse, row_grad, ctx.inv_temperature, ctx.backend, *entropy_args), *nones


def _forward_jvp(ctx, logits_tangent, *_):
    """Tangent of (logp, lse, loss, dlogp[, entropy]) for the logits' tangent; the other inputs' tangents are not
    propagated, as their gradients are not (they are data)."""
    logits, labels, lse, dlogp, *entropy = ctx.saved_tensors
    vocab = logits.shape[-1]
    if logits_tangent is None:
        dlogp_dt, entropy_dt = torch.zeros_like(lse), [torch.zeros_like(lse)] * len(entropy)
    else:
        args = (logits.reshape(-1, vocab), logits_tangent.reshape(-1, vocab), labels, lse, ctx.inv_temperature)
        dlogp_dt, entropy_tangent = softmax_tangents(*args, *entropy)
        entropy_dt = [entropy_tangent] if entropy else []
    return torch.stack([dlogp_dt, _internal_tangent(lse), dlogp * dlogp_dt, _internal_tangent(lse), *entropy_dt])


def _setup_loss_and_grad(ctx, inputs, output):
    # The gradient output is never differentiated: no logits-sized zeros materialised for it in the backward. The
    # entropy output is for logging (its gradient, through entropy_coef, is in the loss's).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1])
    ctx.num_inputs = len(inputs)
    ctx.grad_scale = inputs[13] if len(inputs) > 13 else 1.0


def _loss_and_grad_backward(ctx, grad_output, *_):
    (grad,) = ctx.saved_tensors
    return differentiable_once(scaled(grad, grad_output, ctx.grad_scale)), *(None,) * (ctx.num_inputs - 1)


@dataclasses.dataclass
class _UpstreamGuess:
    """The upstream gradient the last eager training-mode backward of this process received: what the next
    forward writes its gradient for (`grad_scale_guess`)."""

    value: float = 1.0


UPSTREAM_GUESS = _UpstreamGuess()
# Upstream gradients kept as the next guess: powers of two (1 / accumulation steps, loss scales), which scale
# every float32 product of the kernels exactly, so that the gradient is bitwise the same whether the guess held
# or a rescale ran (subnormals apart): a run does not depend on what ran before it in the process. Outside this
# range a guess could underflow or overflow the float32 row scale.
GUESS_RANGE = (2.0**-64, 2.0**64)


def grad_scale_guess(logits: torch.Tensor) -> float:
    """The upstream gradient a training-mode forward writes its gradient for: the last one seen
    (`UPSTREAM_GUESS`), so that a loss scaled the same every step (``loss / accumulation_steps``) needs no
    rescale pass. 1 under tracing (a traced graph always multiplies) and for float16 logits, whose range could
    overflow at a guess that the next step's (smaller) upstream gradient would not."""
    if torch.compiler.is_compiling() or logits.dtype == torch.float16:
        return 1.0
    return UPSTREAM_GUESS.value


def scaled(grad: torch.Tensor, factor: torch.Tensor, written_for: float = 1.0) -> torch.Tensor:
    """``grad * factor / written_for`` for a gradient precomputed in the forward for an upstream gradient of
    ``written_for``. In eager mode (one scalar sync) the factor becomes the next guess (`UPSTREAM_GUESS`), and
    when ``factor == written_for`` and autograd frees the graph after this backward, ``grad`` is returned
    itself: no second logits-sized tensor. A rescale makes a new tensor (``grad`` is also an output of the op,
    which must not change after it returned); so does a retained graph, so that an in-place edit of what this
    backward returns (``torch.autograd.grad(..., retain_graph=True)``) cannot reach the saved gradient that the
    next backward reads (``backward(retain_graph=True)`` costs nothing more: its AccumulateGrad copied the
    still-referenced buffer before). Traced graphs (torch.compile, fake tensors), meta tensors, torch.func's
    wrapped tensors and the batched upstream gradients of ``torch.autograd.grad(..., is_grads_batched=True)``
    always multiply: the check would depend on data."""
    if (torch.compiler.is_compiling() or is_fake(factor) or factor.is_meta or is_functorch_wrapped_tensor(factor)
            or is_legacy_batchedtensor(factor)):
        return grad * (factor.float() / written_for)
    value = float(factor)
    if GUESS_RANGE[0] <= abs(value) <= GUESS_RANGE[1] and math.frexp(value)[0] in (0.5, -0.5):
        UPSTREAM_GUESS.value = value
    if value == written_for and not torch._C._autograd._get_current_graph_task_keep_graph():
        return grad
    return grad * (value / written_for)


def differentiable_once(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` itself; under ``create_graph=True``, a copy whose own gradient raises (a precomputed gradient
    carries no graph, so a penalty built on it would otherwise be silently constant)."""
    if not torch.is_grad_enabled():
        return grad
    # The anchor requires grad so that the copy is part of the graph and its backward (which raises) is reached.
    return _once(grad, torch.zeros((), device=grad.device, requires_grad=True))


@torch.library.custom_op("apa_fast::differentiable_once", mutates_args=())
def _once_op(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return grad.clone()


@_once_op.register_fake
def _(grad, anchor):
    return torch.empty_like(grad)


def not_twice_differentiable(*_):
    raise RuntimeError("apa_fast ops are differentiable once: the derivative of their gradient (double backward, "
                       "e.g. a gradient penalty through torch.autograd.grad(create_graph=True); forward-over-reverse, "
                       "e.g. torch.func.hessian or jacfwd(jacrev(...))) is not supported")


def once_differentiable_op(op):
    """`autograd_function` of an op that computes a gradient: its own derivatives, both modes, raise."""
    return autograd_function(op, not_twice_differentiable, lambda ctx, inputs, output: None, not_twice_differentiable)


_forward = autograd_function(_forward_op, _forward_backward, _setup_forward, _forward_jvp)
# Training mode has no jvp: forward mode takes the two-kernel path (`transformed`).
_loss_and_grad = autograd_function(_loss_and_grad_op, _loss_and_grad_backward, _setup_loss_and_grad)
_backward = once_differentiable_op(_backward_op)
_once = once_differentiable_op(_once_op)


# ----------------------------------------------------------------------------------------------------
# Validation and dispatch shared by the four logits ops.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """What the logits ops and the linear ops pass their kernels, once every argument is checked.

    ``labels``: int32 ``(rows,)``, -1 where the row does not count; ``aux``/``adv``: float32 ``(rows,)`` (empty
    when the kind reads none); ``backend``: resolved; ``param0``/``param1``: the kind's kernel slots;
    ``reduction``: the one applied ("none" for log-probs); ``denom``: what a "mean" divides by (float32), else
    None; ``inv_temperature``: 1 / the checked temperature, a Python number.
    """

    labels: torch.Tensor
    aux: torch.Tensor
    adv: torch.Tensor
    backend: str
    param0: float
    param1: float
    reduction: str
    denom: torch.Tensor | None
    inv_temperature: float


def token_inputs(kind: LossKind, labels, aux, adv, mask, *, rows_shape, vocab, device, anchor, temperature,
                 ignore_index, reduction, normalizer, hyper, backend) -> TokenInputs:
    """Check everything but the logits (or hidden states) whose leading dimensions are ``rows_shape``, and
    resolve the backend. ``aux``/``adv`` are None when ``kind`` does not read them. Numbers are checked against
    their ranges (`apa_fast.validation.TEMPERATURE`, `apa_fast.kinds.HYPER_RANGES`) and used as Python numbers."""
    temperature = check_number("temperature", temperature, TEMPERATURE)
    hyper = {name: check_number(name, value, HYPER_RANGES[name]) for name, value in hyper.items()}
    normalizer = check_reduction(reduction, normalizer, device)
    labels32 = token_labels(labels, mask, ignore_index, rows_shape=rows_shape, vocab=vocab, device=device,
                            anchor=anchor, normalizer=normalizer)
    normalizer = None if normalizer is None else normalizer.to(torch.float32)  # in range: finite and > 0
    empty = torch.empty(0, dtype=torch.float32, device=device)
    aux32 = empty if aux is None else per_token_floats(kind.aux, aux, rows_shape, device, anchor)
    adv32 = empty if adv is None else per_token_floats("advantages", adv, rows_shape, device, anchor)
    reduction = "none" if kind is LOGPROB else reduction
    return TokenInputs(labels32, aux32, adv32, _dispatch.pick_loss_backend(backend, device),
                       *kind.kernel_params(**hyper), reduction,
                       denominator(reduction, (labels32 >= 0).sum(), normalizer), 1.0 / temperature)


def writable_logits(logits: torch.Tensor) -> bool:
    """Whether the gradient may overwrite the logits' memory (``inplace_backward=True``): only memory that the
    autograd graph alone produced and that nothing else sees. Not a leaf's, nor a view of a leaf's (an
    ``nn.Parameter`` used directly as logits: the optimizer would step with the gradient in place of the parameter,
    and ``.grad`` would share its storage); not memory that overlaps itself or had to be copied; not under
    torch.compile, torch.func or forward-mode AD, where ``logits`` stands in for a buffer (traced or wrapped)."""
    if torch.compiler.is_compiling() or transformed(logits):
        return False
    owner = logits._base if logits._is_view() else logits
    return not owner.is_leaf and not needs_copy(logits) and writable_in_place(logits)


def entropy_options(entropy_coef, return_entropy) -> tuple[float, bool, bool]:
    """(entropy_coef, return_entropy, whether the kernels compute the entropy), once checked."""
    entropy_coef = check_number("entropy_coef", entropy_coef, ENTROPY_COEF)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")
    return entropy_coef, return_entropy, return_entropy or entropy_coef != 0


def with_entropy(kind: LossKind, output, entropy_rows, t: TokenInputs, rows_shape, entropy_coef, return_entropy):
    """The public result from the kind's reduced ``output`` and the float32 ``(rows,)`` entropy (None when not
    computed): ``output - entropy_coef * (the same reduction of the entropy)``, and the per-token entropy beside it
    with ``return_entropy`` (differentiable for log-probs, detached for the losses)."""
    if entropy_rows is None:
        return output
    if entropy_coef != 0:
        output = output - entropy_coef * reduce_rows(t.reduction, entropy_rows, t.denom, rows_shape)
    if not return_entropy:
        return output
    entropy = entropy_rows.reshape(rows_shape)
    return output, (entropy if kind is LOGPROB else entropy.detach())


def _fused(kind: LossKind, logits, labels, aux, adv, mask, *, temperature, ignore_index, reduction, backend,
           hyper=None, normalizer=None, inplace_backward=False, entropy_coef=0.0, return_entropy=False):
    """Validate, dispatch, run. ``aux``/``adv`` are None when ``kind`` does not read them."""
    check_float_rows("logits", logits, "V")
    entropy_coef, return_entropy, entropy = entropy_options(entropy_coef, return_entropy)
    rows_shape = logits.shape[:-1]
    t = token_inputs(kind, labels, aux, adv, mask, rows_shape=rows_shape, vocab=logits.shape[-1],
                     device=logits.device, anchor="logits", temperature=temperature, ignore_index=ignore_index,
                     reduction=reduction, normalizer=normalizer, hyper=hyper or {}, backend=backend)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    # The gradient goes to a new buffer when it may not land in the logits' own memory.
    inplace_backward = bool(inplace_backward) and writable_logits(logits)
    if (needs_grad and t.reduction != "none" and not inplace_backward and not transformed(logits)
            and fused_grad_wanted(t.backend, logits)):
        output, _, entropy_rows = _loss_and_grad(logits, t.labels, t.aux, t.adv, t.denom, kind.id, t.inv_temperature,
                                                 t.param0, t.param1, t.reduction, t.backend, entropy_coef, entropy,
                                                 grad_scale_guess(logits))
        # The entropy term is in the output already (and its gradient in the precomputed one).
        return (output, entropy_rows.view(rows_shape)) if return_entropy else output
    # For log-probs the kinds' loss is logp itself (0 where the row does not count), in every backend.
    stats = _forward(logits, t.labels, t.aux, t.adv, kind.id, t.inv_temperature, t.param0, t.param1, t.backend,
                     inplace_backward, entropy)
    output = reduce_rows(t.reduction, stats[2], t.denom, rows_shape)
    return with_entropy(kind, output, stats[4] if entropy else None, t, rows_shape, entropy_coef, return_entropy)


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
    float32. Gradients (and forward-mode tangents: torch.func and torch.autograd.forward_ad work) flow to
    ``logits`` only, in the logits' dtype; the ops are differentiable once.
    ``temperature``, ``lam``, ``clip_eps``, ``max_weight`` in [1e-6, 1e6] and ``normalizer`` in [1e-6, 1e12] (Python
    or NumPy numbers, not bools: `apa_fast.validation.check_number`). ``backend``: "auto" (Triton on CUDA, the
    chunked torch path on CPU), "triton" or "torch". ``inplace_backward=True`` writes the gradient into the logits
    buffer (saving one logits-sized allocation; the gradient goes to a new buffer when the logits' memory belongs to
    a leaf tensor (an ``nn.Parameter``, or a view of one), overlaps itself or had to be copied); use it only when
    nothing reads the logits after the loss. Losses: ``entropy_coef`` (a number
    in [-1e6, 1e6]) subtracts ``entropy_coef`` times the entropy ``-sum_v p_v log p_v`` of
    ``softmax(logits / temperature)`` from every counted token's loss, under the same reduction;
    ``return_entropy=True`` returns ``(loss, entropy)`` with the float32 ``(...)`` per-token entropy of the same
    pass, detached, 0 where not counted."""


def loss(logits, labels, ref_logprobs, advantages, mask=None, *, lam=1.0, temperature=1.0, ignore_index=-100,
         reduction="mean", normalizer=None, backend="auto", inplace_backward=False, entropy_coef=0.0,
         return_entropy=False):
    """APA loss: mean over counted tokens of ``(logp - ref_logprobs - advantages / lam) ** 2``.

    ``logp = log_softmax(logits / temperature)[label]``; ``ref_logprobs`` is log pi_init(label) of the
    frozen initial policy (computed at the same temperature); ``advantages`` are GAE advantages under the
    sampling policy.
    """
    return _fused(APA, logits, labels, ref_logprobs, advantages, mask, temperature=temperature,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, hyper={"lam": lam},
                  normalizer=normalizer, inplace_backward=inplace_backward, entropy_coef=entropy_coef,
                  return_entropy=return_entropy)


def ppo_loss(logits, labels, old_logprobs, advantages, mask=None, *, clip_eps=0.2, temperature=1.0,
             ignore_index=-100, reduction="mean", normalizer=None, backend="auto", inplace_backward=False,
             entropy_coef=0.0, return_entropy=False):
    """PPO clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))``.

    ``ratio = exp(logp - old_logprobs)`` with ``old_logprobs`` from the sampling policy.
    """
    return _fused(PPO, logits, labels, old_logprobs, advantages, mask, temperature=temperature,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, hyper={"clip_eps": clip_eps},
                  normalizer=normalizer, inplace_backward=inplace_backward, entropy_coef=entropy_coef,
                  return_entropy=return_entropy)


def awr_loss(logits, labels, advantages, mask=None, *, lam=1.0, max_weight=20.0, temperature=1.0,
             ignore_index=-100, reduction="mean", normalizer=None, backend="auto", inplace_backward=False,
             entropy_coef=0.0, return_entropy=False):
    """AWR: ``-min(exp(advantages / lam), max_weight) * logp`` (the weight is data, not differentiated)."""
    return _fused(AWR, logits, labels, None, advantages, mask, temperature=temperature, ignore_index=ignore_index,
                  reduction=reduction, backend=backend, hyper={"lam": lam, "max_weight": max_weight},
                  normalizer=normalizer, inplace_backward=inplace_backward, entropy_coef=entropy_coef,
                  return_entropy=return_entropy)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, backend="auto", return_entropy=False):
    """float32 ``(...)`` log-probabilities ``log_softmax(logits / temperature)[label]``, 0 at ignored positions.

    Differentiable through the same fused backward as the losses. ``return_entropy=True``: ``(logp, entropy)``,
    the float32 ``(...)`` entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)`` (0 at ignored
    positions) from the same pass, differentiable too.
    """
    return _fused(LOGPROB, logits, labels, None, None, None, temperature=temperature, ignore_index=ignore_index,
                  reduction="none", backend=backend, return_entropy=return_entropy)


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
    lam = check_number("lam", lam, HYPER_RANGES["lam"])
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
        normalizer = None if normalizer is None else normalizer.to(torch.float32)  # in range: finite and > 0
    # Masked before squaring: garbage (inf, NaN) at masked-out positions gets no gradient path at all.
    terms = torch.where(counted, logprobs.float() - ref - adv / lam, 0.0).square()
    return reduce_rows(reduction, terms.reshape(-1), denominator(reduction, counted.sum(), normalizer), rows_shape)

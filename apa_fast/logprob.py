"""Fused token log-probabilities and policy losses: `apa_fast.loss`, `logprobs`, `ppo_loss`, `awr_loss`.

All four are one autograd Function over one kernel family (``apa_fast.kernels.logprob``): the forward
computes, per token row, the log-softmax of the sampled token with an online log-sum-exp, and a
loss-specific epilogue; the backward writes ``dlogits`` in one pass from the saved log-sum-exp. Neither
materialises a float32 ``[tokens x vocab]`` tensor. The ``torch`` backend runs the same algorithm in
row chunks with PyTorch ops, for CPUs and as a fallback.

Equivalent PyTorch code (what `apa_fast.reference.apa_loss` does, with a float32 ``[N x V]`` copy)::

    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]
    r = logp - ref_logprobs - advantages / lam
    loss = (r ** 2)[counted].mean()        # counted: label != ignore_index and mask
"""

from __future__ import annotations

import math

import torch

from . import _dispatch

# Epilogue selectors; they match the LOSS constexpr of apa_fast.kernels.logprob.
LOGPROB, APA, PPO, AWR = 0, 1, 2, 3
REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The torch backend processes this many bytes of float32 logits at a time.
TORCH_CHUNK_BYTES = 32 * 2**20


# ----------------------------------------------------------------------------------------------------
# Input checks: every one raises before any kernel runs and names the offending argument.
# ----------------------------------------------------------------------------------------------------
def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_row_tensor(name, tensor, shape, device, *, kind, anchor="logits"):
    """``anchor``: the argument whose leading dimensions are the token rows (logits, or hidden states)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({anchor}.shape[:-1]), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but {anchor} is on {device}")
    if kind == "float" and not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if kind == "int" and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {tensor.dtype}")
    if kind == "mask" and (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {tensor.dtype}")


def _check_float_rows(name, tensor, last_dim) -> None:
    """``tensor`` is a float32/bfloat16/float16 ``(..., last_dim)`` tensor with a non-empty last dimension."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., {last_dim}) with {last_dim} >= 1, got {tuple(tensor.shape)}")


def _counted_labels(labels, mask, ignore_index, *, rows_shape, vocab, device, anchor="logits") -> torch.Tensor:
    """Check labels/mask against ``rows_shape`` token rows of a ``vocab``-way softmax.

    Returns int32 ``(rows,)`` labels, -1 where the row does not count.
    """
    _check_row_tensor("labels", labels, rows_shape, device, kind="int", anchor=anchor)
    if mask is not None:
        _check_row_tensor("mask", mask, rows_shape, device, kind="mask", anchor=anchor)
    counted = labels != ignore_index
    out_of_range = counted & ((labels < 0) | (labels >= vocab))
    if out_of_range.any():  # one host sync: a wrong label must never become an out-of-bounds read
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}")
    if mask is not None:
        counted = counted & mask.bool()
    return torch.where(counted, labels, -1).to(torch.int32).reshape(-1)


def _row_floats(name, tensor, rows_shape, device, anchor="logits") -> torch.Tensor:
    _check_row_tensor(name, tensor, rows_shape, device, kind="float", anchor=anchor)
    return tensor.detach().to(torch.float32).reshape(-1).contiguous()


def _token_inputs(labels, aux, adv, mask, *, rows_shape, vocab, device, anchor, temperature, ignore_index,
                  reduction, backend):
    """Check everything but the logits (or hidden states) whose leading dimensions are ``rows_shape``.

    ``aux`` is None or ``(name, tensor)``; ``adv`` None or a tensor. Returns ``(labels32, aux32, adv32,
    backend)``: int32 labels (-1 where the row does not count), float32 ``(rows,)`` per-token data (empty
    when not used) and the resolved backend.
    """
    _check_positive("temperature", temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    labels32 = _counted_labels(labels, mask, ignore_index, rows_shape=rows_shape, vocab=vocab, device=device,
                               anchor=anchor)
    empty = torch.empty(0, dtype=torch.float32, device=device)
    aux32 = empty if aux is None else _row_floats(aux[0], aux[1], rows_shape, device, anchor)
    adv32 = empty if adv is None else _row_floats("advantages", adv, rows_shape, device, anchor)
    return labels32, aux32, adv32, _dispatch.pick_loss_backend(backend, device)


# ----------------------------------------------------------------------------------------------------
# Row layout: (..., V) as an (outer, inner, V) strided view without copying when the strides allow.
# ----------------------------------------------------------------------------------------------------
def _as_rows3d(logits: torch.Tensor) -> torch.Tensor:
    """View ``logits (..., V)`` as ``(outer, inner, V)`` sharing its storage, copying only if impossible.

    Leading dimensions merge when their strides nest (size-1 dimensions drop out); a slice such as
    ``x[:, :-1]`` of a contiguous ``(B, T, V)`` stays two leading dimensions and is not copied. Three or
    more leading dimensions that cannot merge fall back to one contiguous copy.
    """
    dims = [(size, stride) for size, stride in zip(logits.shape[:-1], logits.stride()[:-1], strict=True) if size != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    vocab, stride_v = logits.shape[-1], logits.stride(-1)
    if len(merged) > 2 or vocab * max(stride_v, 1) >= 2**31:
        return _as_rows3d(logits.contiguous())
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (outer, stride_outer), (inner, stride_inner) = merged
    return logits.as_strided((outer, inner, vocab), (stride_outer, stride_inner, stride_v))


# ----------------------------------------------------------------------------------------------------
# The torch backend: the same two passes in row chunks with PyTorch ops.
# ----------------------------------------------------------------------------------------------------
def _row_chunks(rows3d: torch.Tensor):
    """Yield ``(first_row, chunk (n, V))`` views covering the rows in order, each at most TORCH_CHUNK_BYTES."""
    outer, inner, vocab = rows3d.shape
    step = max(1, TORCH_CHUNK_BYTES // (4 * vocab))
    for o in range(outer):
        plane = rows3d[o]
        for start in range(0, inner, step):
            yield o * inner + start, plane[start:start + step]


def _torch_epilogue(kind, logp, aux, adv, param0, param1):
    """Per-row (loss, d loss / d logp) in float32; the torch twin of the kernel's epilogue."""
    if kind == LOGPROB:
        return torch.zeros_like(logp), torch.ones_like(logp)
    if kind == APA:
        residual = logp - aux - adv * param0
        return residual.square(), 2.0 * residual
    if kind == PPO:
        ratio = torch.exp(logp - aux)
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - param0, 1.0 + param0)
        return torch.maximum(unclipped, clipped), torch.where(unclipped >= clipped, unclipped, 0.0)
    weight = torch.exp(adv * param0).clamp(max=param1)
    return -weight * logp, -weight


def _scaled_float32(chunk: torch.Tensor, inv_temperature: float, *, copy: bool) -> torch.Tensor:
    """``chunk / temperature`` in float32; a fresh buffer when ``copy`` (else possibly ``chunk`` itself)."""
    scaled = chunk.to(torch.float32, copy=copy)
    return scaled.mul_(inv_temperature) if inv_temperature != 1.0 else scaled


def _torch_forward(rows3d, labels, aux, adv, *, loss_kind, inv_temperature, param0=0.0, param1=0.0):
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    lse = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    target = torch.empty_like(lse)
    for first, chunk in _row_chunks(rows3d):
        rows = slice(first, first + chunk.shape[0])
        scaled = _scaled_float32(chunk, inv_temperature, copy=inv_temperature != 1.0)
        lse[rows] = torch.logsumexp(scaled, dim=-1)
        target[rows] = scaled.gather(-1, safe_labels[rows, None])[:, 0]
    logp = torch.where(counted, target - lse, 0.0)
    loss, dlogp = _torch_epilogue(loss_kind, logp, aux, adv, param0, param1)
    zero = torch.zeros((), device=logp.device)
    return logp, torch.where(counted, lse, zero), torch.where(counted, loss, zero), torch.where(counted, dlogp, zero)


def _torch_backward(rows3d, labels, lse, row_grad, out3d, *, inv_temperature):
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    scale = row_grad * inv_temperature
    # Rows that do not count (saved lse 0, scale 0) subtract +inf: softmax 0, never exp() overflow into 0 * inf.
    shift = torch.where(counted, lse, float("inf"))
    out_chunks = (chunk for _, chunk in _row_chunks(out3d))
    for (first, chunk), out in zip(_row_chunks(rows3d), out_chunks, strict=True):
        rows = slice(first, first + chunk.shape[0])
        # One float32 buffer per chunk, updated in place: softmax, times -scale, plus scale at the label.
        grad = _scaled_float32(chunk, inv_temperature, copy=True)
        grad.sub_(shift[rows, None]).exp_().mul_(-scale[rows, None])
        grad.scatter_add_(-1, safe_labels[rows, None], scale[rows, None])
        out.copy_(grad)
    return out3d


def _implementation(backend: str):
    if backend == "triton":
        from .kernels import logprob as kernels  # triton imports only when the fused kernels run

        return kernels.forward, kernels.backward
    return _torch_forward, _torch_backward


# ----------------------------------------------------------------------------------------------------
# Reductions: shared with the fused linear ops (apa_fast.linear).
# ----------------------------------------------------------------------------------------------------
def _output_reduction(loss_kind, reduction) -> str:
    """The reduction actually applied: log-probs are always per token."""
    return "none" if loss_kind == LOGPROB else reduction


def _reduce(reduction, per_row, count, rows_shape) -> torch.Tensor:
    """float32 ``per_row (rows,)`` reduced over the ``count`` counted rows (0 elsewhere), or shaped ``rows_shape``."""
    if reduction == "none":
        return per_row.reshape(rows_shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / count.clamp(min=1)


def _upstream_scale(reduction, grad_output, count) -> torch.Tensor:
    """float32 d(objective)/d(per-row value): a scalar for "sum"/"mean", a ``(rows,)`` tensor for "none"."""
    grad_output = grad_output.float()
    if reduction == "none":
        return grad_output.reshape(-1)
    if reduction == "sum":
        return grad_output
    return grad_output / count.clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# The autograd Function shared by every public op.
# ----------------------------------------------------------------------------------------------------
class _FusedLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, aux, adv, loss_kind, inv_temperature, param0, param1, reduction,
                backend, inplace_backward):
        forward_impl, backward_impl = _implementation(backend)
        rows3d = _as_rows3d(logits.detach())
        logp, lse, loss, dlogp = forward_impl(rows3d, labels, aux, adv, loss_kind=loss_kind,
                                              inv_temperature=inv_temperature, param0=param0, param1=param1)
        count = (labels >= 0).sum()
        ctx.reduction = _output_reduction(loss_kind, reduction)
        output = _reduce(ctx.reduction, logp if loss_kind == LOGPROB else loss, count, logits.shape[:-1])

        ctx.save_for_backward(logits, labels, lse, dlogp, count)
        ctx.backward_impl = backward_impl
        ctx.inv_temperature = inv_temperature
        ctx.inplace_backward = inplace_backward
        return output

    @staticmethod
    def backward(ctx, grad_output):
        logits, labels, lse, dlogp, count = ctx.saved_tensors
        row_grad = dlogp * _upstream_scale(ctx.reduction, grad_output, count)
        rows3d = _as_rows3d(logits.detach())
        if ctx.inplace_backward:
            grad_logits, out3d = logits.detach(), rows3d
        else:
            # Same (outer, inner) row decomposition as the logits, contiguous; rows enumerate the leading
            # dimensions in order, so the buffer views back as logits.shape.
            out3d = torch.empty(rows3d.shape, dtype=logits.dtype, device=logits.device)
            grad_logits = out3d.view(logits.shape)
        ctx.backward_impl(rows3d, labels, lse, row_grad.contiguous(), out3d, inv_temperature=ctx.inv_temperature)
        return grad_logits, None, None, None, None, None, None, None, None, None, None


def _fused(loss_kind, logits, labels, aux, adv, mask, *, temperature, ignore_index, reduction, backend,
           param0=0.0, param1=0.0, inplace_backward=False):
    """Validate, dispatch and apply the Function. ``aux``/``adv`` are None when the loss does not use them."""
    _check_float_rows("logits", logits, "V")
    labels32, aux32, adv32, resolved = _token_inputs(
        labels, aux, adv, mask, rows_shape=logits.shape[:-1], vocab=logits.shape[-1], device=logits.device,
        anchor="logits", temperature=temperature, ignore_index=ignore_index, reduction=reduction, backend=backend)
    return _FusedLogprobLoss.apply(logits, labels32, aux32, adv32, loss_kind, 1.0 / temperature,
                                   float(param0), float(param1), reduction, resolved, inplace_backward)


# ----------------------------------------------------------------------------------------------------
# Public functionals.
# ----------------------------------------------------------------------------------------------------
_COMMON_DOC = """
    Shapes and dtypes: ``logits (..., V)`` float32/bfloat16/float16, any strides, aligned with ``labels``
    (position i scores ``labels[i]``: pass ``logits[:, :-1]`` with ``input_ids[:, 1:]`` for a causal LM);
    ``labels (...)`` int64/int32 in ``[0, V)`` or ``ignore_index``; per-token float tensors ``(...)``;
    ``mask (...)`` bool or 0/1, the response tokens. A token counts when its label is not ``ignore_index``
    and its mask is set. ``reduction``: "mean" (over counted tokens; 0 when none count), "sum", or "none"
    (a float32 ``(...)`` tensor, 0 where not counted). The result is float32. Gradients flow to ``logits``
    only, in the logits' dtype. ``backend``: "auto" (Triton on CUDA, the chunked torch path on CPU),
    "triton" or "torch". ``inplace_backward=True`` writes the gradient into the logits buffer (saving one
    logits-sized allocation); use it only when nothing reads the logits after the loss."""


def loss(logits, labels, ref_logprobs, advantages, mask=None, *, lam=1.0, temperature=1.0, ignore_index=-100,
         reduction="mean", backend="auto", inplace_backward=False):
    """APA loss: mean over counted tokens of ``(logp - ref_logprobs - advantages / lam) ** 2``.

    ``logp = log_softmax(logits / temperature)[label]``; ``ref_logprobs`` is log pi_init(label) of the
    frozen initial policy; ``advantages`` are GAE advantages under the sampling policy.
    """
    _check_positive("lam", lam)
    return _fused(APA, logits, labels, ("ref_logprobs", ref_logprobs), advantages, mask, temperature=temperature,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, param0=1.0 / lam,
                  inplace_backward=inplace_backward)


def ppo_loss(logits, labels, old_logprobs, advantages, mask=None, *, clip_eps=0.2, temperature=1.0,
             ignore_index=-100, reduction="mean", backend="auto", inplace_backward=False):
    """PPO clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps))``.

    ``ratio = exp(logp - old_logprobs)`` with ``old_logprobs`` from the sampling policy.
    """
    _check_positive("clip_eps", clip_eps)
    return _fused(PPO, logits, labels, ("old_logprobs", old_logprobs), advantages, mask, temperature=temperature,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, param0=clip_eps,
                  inplace_backward=inplace_backward)


def awr_loss(logits, labels, advantages, mask=None, *, lam=1.0, max_weight=20.0, temperature=1.0,
             ignore_index=-100, reduction="mean", backend="auto", inplace_backward=False):
    """AWR: ``-min(exp(advantages / lam), max_weight) * logp`` (the weight is data, not differentiated)."""
    _check_positive("lam", lam)
    _check_positive("max_weight", max_weight)
    return _fused(AWR, logits, labels, None, advantages, mask, temperature=temperature, ignore_index=ignore_index,
                  reduction=reduction, backend=backend, param0=1.0 / lam, param1=max_weight,
                  inplace_backward=inplace_backward)


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, backend="auto"):
    """float32 ``(...)`` log-probabilities ``log_softmax(logits / temperature)[label]``, 0 at ignored positions.

    Differentiable through the same fused backward as the losses.
    """
    return _fused(LOGPROB, logits, labels, None, None, None, temperature=temperature, ignore_index=ignore_index,
                  reduction="none", backend=backend)


for _fn in (loss, ppo_loss, awr_loss, logprobs):
    _fn.__doc__ += _COMMON_DOC

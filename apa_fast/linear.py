"""The APA loss and token log-probs straight from hidden states: `apa_fast.linear_loss`, `linear_logprobs`.

The lm_head projection and the log-softmax run together, one chunk of token rows at a time, so at most one
chunk of logits exists: for GPT-J (V = 50,400) and 16k tokens that is a few hundred MB instead of 1.6 GB of
bf16 logits plus their gradient. Each chunk of logits goes through the same implementation as
`apa_fast.loss` (`logprob._implementation`: the Triton kernels on CUDA, the chunked torch path on CPU) and
its gradient is written over the chunk's logits in place. Rows that do not count (ignored label or masked
out, typically the prompt) are never projected.

Gradients. For a scalar loss ("mean"/"sum") the upstream gradient is a single number, so the forward
computes the gradients of hidden, weight and bias while each chunk's logits are at hand (three matmuls in
all) and the backward only multiplies them by it. For per-token outputs (``reduction="none"``,
`linear_logprobs`) the backward recomputes each chunk's logits from the saved hidden states (four matmuls).
Both run the same sweep (`_sweep`). The weight gradient accumulates in float32 across chunks.

Equivalent PyTorch code::

    logits = hidden @ weight.T + bias                  # (..., V) in hidden's dtype
    loss = apa_fast.loss(logits, labels, ref_logprobs, advantages, mask, lam=lam, ...)
"""

from __future__ import annotations

import dataclasses
import os

import torch

from . import logprob, zero3
from .logprob import APA, LOGPROB

# Upper bound on one chunk's logits, by device type. On CPU (float32 bytes) the torch path holds about four
# float32 temporaries of its chunk, so 8 MiB keeps the loss's working set near 50 MiB; on CUDA the Triton
# kernels hold none, and a chunk of 1-3k rows keeps the matmul efficient while its logits stay far below
# the full [tokens x vocab] tensor.
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}
# A chunk never takes more than this fraction of the free memory.
FREE_MEMORY_FRACTION = 8
# Chunks are a multiple of this many rows when they can be (tensor-core tiles).
ROW_MULTIPLE = 64


# ----------------------------------------------------------------------------------------------------
# Input checks for the projection; the per-token inputs are checked by logprob._token_inputs.
# ----------------------------------------------------------------------------------------------------
def _check_projection(hidden, weight, bias) -> None:
    logprob._check_float_rows("hidden", hidden, "H")
    hidden_size = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    zero3.check_gathered("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V, {hidden_size}) (V >= 1, hidden.shape[-1] = {hidden_size}), "
                         f"got {tuple(weight.shape)}")
    _check_like_hidden("weight", weight, hidden)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        zero3.check_gathered("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (weight.shape[0]), got {tuple(bias.shape)}")
        _check_like_hidden("bias", bias, hidden)


def _check_like_hidden(name, tensor, hidden) -> None:
    if tensor.device != hidden.device:
        raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if tensor.dtype != hidden.dtype:
        raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {tensor.dtype}")


def _chunk_rows(chunk_size, hidden_size, vocab, dtype, device) -> int:
    """Rows per chunk: ``chunk_size`` when given, else the most whose logits fit the device's budget."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return chunk_size
    budget = min(CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]), _free_bytes(device) // FREE_MEMORY_FRACTION)
    # Per row: the logits (float32 on CPU, where the torch path upcasts) plus the gathered hidden row and its grad.
    logit_bytes = 4 if device.type == "cpu" else torch.finfo(dtype).bits // 8
    row_bytes = vocab * logit_bytes + 2 * hidden_size * torch.finfo(dtype).bits // 8
    rows = max(1, budget // row_bytes)
    return rows - rows % ROW_MULTIPLE if rows >= ROW_MULTIPLE else rows


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------
# The chunked sweep.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Projection:
    """``hidden @ weight.T + bias`` for selected token rows. ``hidden3d``: ``(outer, inner, H)`` view."""

    hidden3d: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, hidden, weight, bias):
        return cls(logprob._as_rows3d(hidden.detach()), weight.detach(), None if bias is None else bias.detach())

    def hidden_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, H)`` copy of the flat token rows ``rows`` (no copy of the whole, possibly strided, hidden)."""
        inner = self.hidden3d.shape[1]
        return self.hidden3d[rows // inner, rows % inner]

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """``(n, V)`` contiguous logits in hidden's dtype."""
        if self.bias is None:
            return hidden_rows @ self.weight.T
        return torch.addmm(self.bias, hidden_rows, self.weight.T)


@dataclasses.dataclass(frozen=True)
class _LogitsPass:
    """What every chunk of logits goes through: one implementation of logprob's kernel family."""

    forward_impl: object
    backward_impl: object
    loss_kind: int
    inv_temperature: float
    param0: float
    param1: float


@dataclasses.dataclass
class _Gradients:
    """Gradient buffers, None where the input needs none: hidden ``(rows, H)`` in hidden's dtype; weight and
    bias accumulate in float32 until `finished`."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, proj: _Projection, rows: int, needed: tuple[bool, bool, bool]):
        hidden3d, weight, bias = proj.hidden3d, proj.weight, proj.bias
        return cls(
            hidden3d.new_zeros(rows, hidden3d.shape[-1]) if needed[0] else None,
            torch.zeros_like(weight, dtype=torch.float32) if needed[1] else None,
            torch.zeros_like(bias, dtype=torch.float32) if needed[2] and bias is not None else None,
        )

    def accumulate(self, proj: _Projection, rows, hidden_rows, dlogits) -> None:
        """Add the contribution of ``dlogits (n, V)`` for the flat token ``rows``."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, dlogits @ proj.weight)
        if self.weight is not None:
            if dlogits.dtype == torch.float32:
                self.weight.addmm_(dlogits.T, hidden_rows)  # in place: no second (V, H) buffer
            else:
                # The chunk's product is rounded to the inputs' dtype (CPU matmuls have no float32 output
                # for bf16 inputs); the sum over chunks is float32.
                self.weight.add_(dlogits.T @ hidden_rows)
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0, dtype=torch.float32))

    def finished(self, proj: _Projection) -> _Gradients:
        """The gradients in their inputs' dtypes."""
        return _Gradients(
            self.hidden,
            None if self.weight is None else self.weight.to(proj.weight.dtype),
            None if self.bias is None else self.bias.to(proj.bias.dtype),
        )

    def scaled(self, factor: torch.Tensor) -> _Gradients:
        if bool(factor == 1):  # loss.backward(): no second (V, H) buffer
            return self
        return _Gradients(*(None if g is None else g * factor.to(g.dtype) for g in (self.hidden, self.weight,
                                                                                      self.bias)))


def _sweep(proj, passes, labels, counted_rows, chunk_rows, *, aux=None, adv=None, row_scale=None, lse=None,
           row_grad=None, grads=None):
    """One pass over ``counted_rows`` (int64, flat token indices), one chunk of logits at a time.

    Forward mode (``aux``/``adv`` given, float32 ``(rows,)``, empty when the epilogue ignores them): returns
    float32 ``(4, rows)`` = (logp, lse, loss, dlogp), zero on rows that do not count; with ``grads`` it also
    accumulates the gradients of ``sum(row_scale * loss)`` (``row_scale`` a scalar tensor).
    Backward mode (``lse`` and ``row_grad``, float32 ``(rows,)``): accumulates into ``grads`` the gradients
    of ``sum(row_grad * logp)``.
    """
    forward_mode = aux is not None
    stats = torch.zeros(4, labels.numel(), dtype=torch.float32, device=labels.device) if forward_mode else None
    for start in range(0, counted_rows.numel(), chunk_rows):
        rows = counted_rows[start:start + chunk_rows]
        hidden_rows = proj.hidden_rows(rows)
        logits3d = proj.logits(hidden_rows)[None]
        chunk_labels = labels[rows]
        if forward_mode:
            chunk_stats = torch.stack(passes.forward_impl(
                logits3d, chunk_labels, aux[rows] if aux.numel() else aux, adv[rows] if adv.numel() else adv,
                loss_kind=passes.loss_kind, inv_temperature=passes.inv_temperature, param0=passes.param0,
                param1=passes.param1))
            stats[:, rows] = chunk_stats
            chunk_lse, chunk_row_grad = chunk_stats[1], chunk_stats[3] * row_scale
        else:
            chunk_lse, chunk_row_grad = lse[rows], row_grad[rows]
        if grads is not None:
            # dlogits overwrite the chunk's logits: nothing reads them afterwards.
            passes.backward_impl(logits3d, chunk_labels, chunk_lse, chunk_row_grad.contiguous(), logits3d,
                                 inv_temperature=passes.inv_temperature)
            grads.accumulate(proj, rows, hidden_rows, logits3d[0])
    return stats


# ----------------------------------------------------------------------------------------------------
# The autograd Function.
# ----------------------------------------------------------------------------------------------------
class _FusedLinearLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, aux, adv, passes, reduction, chunk_rows, grad_enabled):
        proj = _Projection.of(hidden, weight, bias)
        counted_rows = torch.nonzero(labels >= 0).squeeze(1)  # one host sync: the chunk loop's length
        count = torch.tensor(counted_rows.numel(), device=labels.device)
        ctx.reduction = logprob._output_reduction(passes.loss_kind, reduction)
        needed = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        # A scalar output has a scalar upstream gradient: compute the gradients now, scale them in backward.
        grads_now = ctx.reduction != "none" and any(needed)
        grads = _Gradients.zeros(proj, labels.numel(), needed) if grads_now else None
        row_scale = logprob._upstream_scale(ctx.reduction, torch.ones((), device=labels.device), count)
        logp, lse, loss, dlogp = _sweep(proj, passes, labels, counted_rows, chunk_rows, aux=aux, adv=adv,
                                        row_scale=row_scale, grads=grads)
        output = logprob._reduce(ctx.reduction, logp if passes.loss_kind == LOGPROB else loss, count,
                                 hidden.shape[:-1])

        ctx.grads = None if grads is None else grads.finished(proj)
        if grads is None and any(needed):
            ctx.save_for_backward(hidden, weight, bias, labels, counted_rows, lse, dlogp, count)
        ctx.passes, ctx.chunk_rows, ctx.hidden_shape, ctx.needed = passes, chunk_rows, hidden.shape, needed
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is not None:
            grads = ctx.grads.scaled(grad_output.float())
        else:
            hidden, weight, bias, labels, counted_rows, lse, dlogp, count = ctx.saved_tensors
            proj = _Projection.of(hidden, weight, bias)
            grads = _Gradients.zeros(proj, labels.numel(), ctx.needed)
            row_grad = dlogp * logprob._upstream_scale(ctx.reduction, grad_output, count)
            _sweep(proj, ctx.passes, labels, counted_rows, ctx.chunk_rows, lse=lse, row_grad=row_grad, grads=grads)
            grads = grads.finished(proj)
        grad_hidden = None if grads.hidden is None else grads.hidden.view(ctx.hidden_shape)
        return grad_hidden, grads.weight, grads.bias, None, None, None, None, None, None, None


def _fused_linear(loss_kind, hidden, weight, bias, labels, aux, adv, mask, *, temperature, ignore_index,
                  reduction, chunk_size, backend, param0=0.0, param1=0.0):
    """Validate, dispatch and apply the Function. ``aux``/``adv`` are None when the loss does not use them."""
    _check_projection(hidden, weight, bias)
    labels32, aux32, adv32, resolved = logprob._token_inputs(
        labels, aux, adv, mask, rows_shape=hidden.shape[:-1], vocab=weight.shape[0], device=hidden.device,
        anchor="hidden", temperature=temperature, ignore_index=ignore_index, reduction=reduction, backend=backend)
    chunk_rows = _chunk_rows(chunk_size, hidden.shape[-1], weight.shape[0], hidden.dtype, hidden.device)
    passes = _LogitsPass(*logprob._implementation(resolved), loss_kind, 1.0 / temperature, float(param0),
                         float(param1))
    return _FusedLinearLogprobLoss.apply(hidden, weight, bias, labels32, aux32, adv32, passes, reduction, chunk_rows,
                                         torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------------
# Public functionals.
# ----------------------------------------------------------------------------------------------------
_COMMON_DOC = """
    Shapes and dtypes: ``hidden (..., H)`` float32/bfloat16/float16, any strides (the final hidden states,
    aligned with ``labels``: position i scores ``labels[i]``); ``weight (V, H)`` the lm_head weight and
    ``bias (V,)`` (optional), both in hidden's dtype and on its device; ``labels (...)`` int64/int32 in
    ``[0, V)`` or ``ignore_index``; per-token float tensors ``(...)``; ``mask (...)`` bool or 0/1. Same
    semantics, errors and reductions as `apa_fast.loss` on ``logits = hidden @ weight.T + bias``; the result
    is float32. Gradients flow to ``hidden``, ``weight`` and ``bias`` in their dtypes. ``chunk_size``: token
    rows projected at a time (default: from H, V and the free memory). ``backend``: as for `apa_fast.loss`.
    Under DeepSpeed ZeRO-3 call it (forward and backward) inside
    ``apa_fast.zero3.gathered(weight, bias, model=engine.module)``."""


def linear_loss(hidden, weight, labels, ref_logprobs, advantages, mask=None, *, bias=None, lam=1.0,
                temperature=1.0, ignore_index=-100, reduction="mean", chunk_size=None, backend="auto"):
    """APA loss from hidden states: `apa_fast.loss` of ``hidden @ weight.T + bias`` without the logits tensor.

    Mean over counted tokens of ``(logp - ref_logprobs - advantages / lam) ** 2``.
    """
    logprob._check_positive("lam", lam)
    return _fused_linear(APA, hidden, weight, bias, labels, ("ref_logprobs", ref_logprobs), advantages, mask,
                         temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                         chunk_size=chunk_size, backend=backend, param0=1.0 / lam)


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100, chunk_size=None,
                    backend="auto"):
    """float32 ``(...)`` ``log_softmax((hidden @ weight.T + bias) / temperature)[label]``, 0 where ignored."""
    return _fused_linear(LOGPROB, hidden, weight, bias, labels, None, None, None, temperature=temperature,
                         ignore_index=ignore_index, reduction="none", chunk_size=chunk_size, backend=backend)


for _fn in (linear_loss, linear_logprobs):
    _fn.__doc__ += _COMMON_DOC

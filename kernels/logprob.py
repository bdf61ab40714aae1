"""Triton kernels for token log-probabilities and the policy losses built on them (APA, PPO, AWR).

One kernel family, one loss-specific epilogue:

* ``_logprob_fwd_kernel``: one program per token row. A single pass over the vocabulary in blocks keeps an
  online log-sum-exp in float32 (whatever the logits' dtype), gathers the sampled token's logit, and runs
  the epilogue selected by the ``LOSS`` constexpr. It writes four float32 numbers per row: the log-prob,
  the log-sum-exp, the per-token loss and ``d loss / d logp``. Nothing of size ``[rows x vocab]`` is written.
* ``_logprob_bwd_kernel``: a 2-D grid (rows x vocabulary blocks). Each program reads one block of logits
  once, rebuilds the softmax from the saved log-sum-exp and writes
  ``dlogits = g_row * (onehot(label) - softmax) / temperature`` in the logits' dtype, optionally into the
  logits buffer itself.

Row addressing: the leading dimensions of ``logits (..., V)`` are collapsed by the host into at most two
(outer, inner) with their own strides, so slices such as ``logits[:, :-1]`` need no copy. A row whose
label is negative does not count (the host folds ``ignore_index`` and the mask into that): its loss and
gradient coefficient are 0, its logits are never read, and its gradient row is exact zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Epilogue selectors (the LOSS constexpr), equal to those of apa_fast.logprob. Kernels may read module
# globals only when they are constexpr.
LOGPROB, APA, PPO, AWR = (tl.constexpr(kind) for kind in range(4))
EPILOGUE_NAMES = ("logprob", "apa", "ppo", "awr")

# The block cap keeps the forward's registers bounded (no spills at 4096 with 8 warps on sm_90; see
# `python -m apa_fast.info --aot sm_90`); larger vocabularies loop over more blocks.
MAX_BLOCK_V = 4096


def block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab`` columns: the whole row up to MAX_BLOCK_V."""
    block = min(triton.next_power_of_2(max(vocab, 16)), MAX_BLOCK_V)
    num_warps = 2 if block <= 512 else 4 if block <= 2048 else 8
    return block, num_warps


@triton.jit
def _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner):
    # int64 before any multiplication: rows x V may exceed 2**31 elements.
    outer = row // inner_size
    inner = row - outer * inner_size
    return logits_ptr + outer * stride_outer + inner * stride_inner


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, stride_v, inner_size,
    labels_ptr, aux_ptr, adv_ptr,
    logp_ptr, lse_ptr, loss_ptr, dlogp_ptr,
    vocab, inv_temperature, param0, param1,
    LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner)
    label = tl.load(labels_ptr + row)
    counted = label >= 0

    # Online log-sum-exp over the row; rows that do not count skip the loop and read nothing.
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    if counted:
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols * stride_v, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            x = x * inv_temperature
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
    lse = running_max + tl.log(tl.where(counted, running_sum, 1.0))

    target = tl.load(base + tl.where(counted, label, 0) * stride_v).to(tl.float32) * inv_temperature
    logp = tl.where(counted, target - lse, 0.0)

    # Loss epilogue: per-token loss and its derivative with respect to logp.
    if LOSS == LOGPROB:
        loss = tl.zeros((), tl.float32)
        dlogp = tl.full((), 1.0, tl.float32)
    elif LOSS == APA:
        # param0 = 1 / lam.  r = logp - log pi_init - A / lam;  loss = r^2.
        residual = logp - tl.load(aux_ptr + row) - tl.load(adv_ptr + row) * param0
        loss = residual * residual
        dlogp = 2.0 * residual
    elif LOSS == PPO:
        # param0 = clip epsilon. aux = log-prob under the sampling policy.
        adv = tl.load(adv_ptr + row)
        ratio = tl.exp(logp - tl.load(aux_ptr + row))
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - param0), 1.0 + param0)
        loss = tl.maximum(unclipped, clipped)
        # The clipped branch is constant in logp; where both agree the ratio is inside the clip range.
        dlogp = tl.where(unclipped >= clipped, unclipped, 0.0)
    else:
        # AWR. param0 = 1 / lam, param1 = the weight cap: loss = -min(exp(A / lam), cap) * logp.
        weight = tl.minimum(tl.exp(tl.load(adv_ptr + row) * param0), param1)
        loss = -weight * logp
        dlogp = -weight

    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, tl.where(counted, lse, 0.0))
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(dlogp_ptr + row, tl.where(counted, dlogp, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, stride_v, inner_size,
    grad_ptr, grad_stride_outer, grad_stride_inner, grad_stride_v,
    labels_ptr, lse_ptr, row_grad_ptr,
    vocab, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)

    base = _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner)
    # Rows that do not count read nothing: x = -inf gives softmax 0 and, with row_grad 0, exact zeros.
    readable = cols < tl.where(label >= 0, vocab, 0)
    x = tl.load(base + cols * stride_v, mask=readable, other=float("-inf")).to(tl.float32)
    softmax = tl.exp(x * inv_temperature - tl.load(lse_ptr + row))
    scale = tl.load(row_grad_ptr + row) * inv_temperature
    grad = scale * (tl.where(cols == label, 1.0, 0.0) - softmax)

    grad_base = _row_base(grad_ptr, row, inner_size, grad_stride_outer, grad_stride_inner)
    tl.store(grad_base + cols * grad_stride_v, grad.to(grad_ptr.dtype.element_ty), mask=cols < vocab)


def _layout(rows3d: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_outer, stride_inner, stride_v, inner_size) of an ``(outer, inner, V)`` view."""
    return rows3d.stride(0), rows3d.stride(1), rows3d.stride(2), rows3d.shape[1]


def forward(rows3d, labels, aux, adv, *, loss_kind, inv_temperature, param0=0.0, param1=0.0):
    """Launch the forward on ``rows3d (outer, inner, V)``.

    ``labels``: int32 ``(outer * inner,)``, negative where the row does not count; ``aux``, ``adv``:
    float32 ``(rows,)`` (ignored by the epilogues that do not use them). Returns float32 ``(rows,)``
    tensors ``(logp, lse, loss, dlogp)``.
    """
    rows = labels.numel()
    logp, lse, loss, dlogp = torch.empty((4, rows), dtype=torch.float32, device=rows3d.device)
    if rows == 0:
        return logp, lse, loss, dlogp
    vocab = rows3d.shape[-1]
    block, num_warps = block_config(vocab)
    _logprob_fwd_kernel[(rows,)](
        rows3d, *_layout(rows3d),
        labels, aux, adv,
        logp, lse, loss, dlogp,
        vocab, inv_temperature, param0, param1,
        LOSS=loss_kind, BLOCK_V=block, num_warps=num_warps,
    )
    return logp, lse, loss, dlogp


def backward(rows3d, labels, lse, row_grad, out3d, *, inv_temperature):
    """Write ``dlogits`` for ``rows3d`` into ``out3d`` (same shape; may be ``rows3d`` itself).

    ``row_grad``: float32 ``(rows,)``, the upstream gradient times ``d loss / d logp`` (0 where the row
    does not count).
    """
    rows = labels.numel()
    if rows == 0:
        return out3d
    vocab = rows3d.shape[-1]
    block, num_warps = block_config(vocab)
    _logprob_bwd_kernel[(rows, triton.cdiv(vocab, block))](
        rows3d, *_layout(rows3d),
        out3d, *_layout(out3d)[:3],
        labels, lse, row_grad,
        vocab, inv_temperature,
        BLOCK_V=block, num_warps=num_warps,
    )
    return out3d


def aot_variants():
    """Every (kernel, signature, constexprs, num_warps, label) the launchers can produce, for AOT checks.

    The signature mirrors what the launchers pass: 64-bit row strides (the runtime specialises small ones to
    32 bits, a subset), a unit vocabulary stride (the common case, which Triton specialises to a constant).
    """
    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    strides = {"stride_outer": "i64", "stride_inner": "i64", "inner_size": "i32"}
    for vocab in (3, 1003, 50400):
        block, num_warps = block_config(vocab)
        for dtype, ptr in pointer.items():
            for loss in (LOGPROB, APA, PPO, AWR):
                signature = {"logits_ptr": ptr, **strides, "labels_ptr": "*i32", "aux_ptr": "*fp32",
                             "adv_ptr": "*fp32", "logp_ptr": "*fp32", "lse_ptr": "*fp32", "loss_ptr": "*fp32",
                             "dlogp_ptr": "*fp32", "vocab": "i32", "inv_temperature": "fp32", "param0": "fp32",
                             "param1": "fp32"}
                constexprs = {"stride_v": 1, "LOSS": loss.value, "BLOCK_V": block}
                yield (_logprob_fwd_kernel, signature, constexprs, num_warps,
                       f"{EPILOGUE_NAMES[loss.value]} {str(dtype)[6:]} BLOCK_V={block}")
            signature = {"logits_ptr": ptr, **strides, "grad_ptr": ptr, "grad_stride_outer": "i64",
                         "grad_stride_inner": "i64", "labels_ptr": "*i32", "lse_ptr": "*fp32",
                         "row_grad_ptr": "*fp32", "vocab": "i32", "inv_temperature": "fp32"}
            constexprs = {"stride_v": 1, "grad_stride_v": 1, "BLOCK_V": block}
            yield (_logprob_bwd_kernel, signature, constexprs, num_warps, f"{str(dtype)[6:]} BLOCK_V={block}")

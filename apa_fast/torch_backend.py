"""The PyTorch implementation of the log-prob kernel family: the Triton kernels' two passes in row chunks.

Same contract as ``apa_fast.kernels.logprob.forward`` / ``backward``, for CPUs and as a fallback: float32
scratch buffers of one chunk of ``TORCH_CHUNK_BYTES`` (at most three, with the entropy or 16-bit logits) are
reused across the chunks, never the float32 ``[rows x vocab]`` tensor. Each chunk goes through one fused ATen
softmax, written over the gradient buffer where it can be; the entropy, when asked for, comes from the same
softmax as the log-sum-exp, and its gradient joins the log-prob's in the same pass.
"""

from __future__ import annotations

import dataclasses

import torch

from .kinds import KINDS

# Bytes of float32 logits processed at a time.
TORCH_CHUNK_BYTES = 32 * 2**20
# Log-probabilities are clamped here before they multiply a probability: exp(-200) is 0 in float32, so the clamp
# only touches columns whose probability is already 0, and turns their 0 * -inf (a -inf logit) into 0.
LOGP_FLOOR = -200.0


def row_chunks(rows3d: torch.Tensor):
    """Yield ``(first_row, chunk (n, V))`` views covering the rows in order, each at most TORCH_CHUNK_BYTES."""
    outer, inner, vocab = rows3d.shape
    step = max(1, TORCH_CHUNK_BYTES // (4 * vocab))
    for o in range(outer):
        plane = rows3d[o]
        for start in range(0, inner, step):
            yield o * inner + start, plane[start:start + step]


class _Scratch:
    """Float32 chunk buffers by name, allocated at the first chunk's size and reused by the next chunks (a fresh
    32 MiB allocation per chunk would pay its page faults every time)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        rows, vocab = like.shape
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = torch.empty(rows, vocab, dtype=torch.float32, device=like.device)
        return buffer[:rows]


@dataclasses.dataclass
class _ChunkSoftmax:
    """One chunk's softmax and row statistics, float32: ``probs (n, V)``, ``lse``/``target``/``log_total`` ``(n,)``
    (the labels' scaled logits; ``log S``, ``S = sum exp(z / T - max)``), and ``shifted (n, V)`` = ``z / T - max``
    clamped at LOGP_FLOOR when kept for the entropy."""

    probs: torch.Tensor
    lse: torch.Tensor
    target: torch.Tensor
    log_total: torch.Tensor
    shifted: torch.Tensor | None


def _chunk_softmax(chunk, safe_labels, inv_temperature, scratch, probs=None, keep_shifted=False) -> _ChunkSoftmax:
    """The softmax of ``chunk (n, V) / T`` written into ``probs`` (float32, may be ``chunk`` itself: the gradient
    written over the logits) or a scratch buffer, by one fused ATen softmax: one sweep of exponentials, where
    ``torch.logsumexp`` takes six passes and their temporaries. ``log S`` comes from the row maximum's probability,
    ``exp(0) / S``, so no second sweep is needed. An all -inf row has lse -inf (as torch.logsumexp)."""
    scaled = chunk
    if chunk.dtype != torch.float32 or inv_temperature != 1.0:
        scaled = scratch.get("scaled", chunk).copy_(chunk)
        if inv_temperature != 1.0:
            scaled.mul_(inv_temperature)
    if probs is None:
        probs = scaled if scaled is not chunk else scratch.get("probs", chunk)
    # Read before the softmax overwrites them when probs is the chunk.
    target = scaled.gather(-1, safe_labels[:, None])[:, 0]
    row_max = scaled.amax(-1)
    all_minus_inf = row_max == float("-inf")
    shifted = None
    if keep_shifted:
        shift = torch.where(all_minus_inf, 0.0, row_max)[:, None]
        shifted = torch.sub(scaled, shift, out=scratch.get("shifted", chunk)).clamp_(min=LOGP_FLOOR)
    # In place when probs is scaled (or the chunk, for a gradient written over the logits): into a contiguous
    # out=, ATen's CPU and CUDA softmax kernels read each element before they write it (the in-place tests).
    torch._softmax(scaled, -1, False, out=probs)
    log_total = probs.amax(-1).log_().neg_()
    lse = torch.where(all_minus_inf, float("-inf"), row_max + log_total)
    return _ChunkSoftmax(probs, lse, target, log_total, shifted)


def _chunk_entropy(softmax: _ChunkSoftmax) -> torch.Tensor:
    """float32 ``(n,)`` ``-sum p log p = log S - sum(p * (z / T - max))``, relative to the row maximum (``lse - sum(p *
    z)`` would lose ``|lse| * 2**-24`` to cancellation: 1e-3 at logits of 1e4); 0 on an all -inf row. The clamp
    of ``shifted`` turns 0 * -inf (a -inf column) into 0 * LOGP_FLOOR."""
    entropy = softmax.log_total - torch.linalg.vecdot(softmax.probs, softmax.shifted)
    return torch.where(softmax.lse == float("-inf"), 0.0, entropy)


def _finish_rows(kind, counted, target, lse, aux, adv, param0, param1):
    """(logp, lse, loss, dlogp) of rows; rows that do not count may hold anything (NaN, inf): `where` keeps
    their values out of every output."""
    zero = torch.zeros((), device=lse.device)
    logp = torch.where(counted, target - lse, zero)
    loss, dlogp = KINDS[kind].epilogue(logp, aux, adv, param0, param1)
    return logp, torch.where(counted, lse, zero), torch.where(counted, loss, zero), torch.where(counted, dlogp, zero)


def _write_grad(softmax, scale, safe_labels, counted, out, entropy=None, entropy_scale=None) -> None:
    """``out = scale * (onehot - p) - entropy_scale * p * (log p + entropy)`` over ``softmax.probs``, in place
    (``log p = shifted - log S``). ``entropy_scale`` None: no entropy term."""
    grad = softmax.probs
    if entropy_scale is None:
        grad.mul_(-scale[:, None])
    else:
        # -p * (scale + entropy_scale * (H - log S) + entropy_scale * shifted)
        offset = scale + entropy_scale * (entropy - softmax.log_total)
        grad.mul_(softmax.shifted.mul_(-entropy_scale[:, None]).sub_(offset[:, None]))
    grad.scatter_add_(-1, safe_labels[:, None], scale[:, None])
    if not bool(counted.all()):  # exact zeros whatever the logits of those rows hold; those rows only
        grad.index_fill_(0, torch.nonzero(~counted).squeeze(1), 0.0)
    if grad is not out:
        out.copy_(grad)


def _float32_out(out: torch.Tensor) -> torch.Tensor | None:
    """``out`` when the softmax can be written straight into it, else None (a scratch buffer, then copied): float32
    and contiguous, as ATen's softmax writes a non-contiguous ``out=`` as if it were contiguous."""
    return out if out.dtype == torch.float32 and out.is_contiguous() else None


def forward(rows3d, labels, aux, adv, *, loss_kind, inv_temperature, param0=0.0, param1=0.0, entropy=False):
    """float32 ``(rows,)`` ``(logp, lse, loss, dlogp)`` of ``rows3d (outer, inner, V)``, and ``entropy`` fifth
    when asked for; 0 where labels < 0."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    lse = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    target = torch.empty_like(lse)
    entropies = torch.empty_like(lse) if entropy else None
    scratch = _Scratch()
    for first, chunk in row_chunks(rows3d):
        rows = slice(first, first + chunk.shape[0])
        softmax = _chunk_softmax(chunk, safe_labels[rows], inv_temperature, scratch, keep_shifted=entropy)
        lse[rows], target[rows] = softmax.lse, softmax.target
        if entropy:
            entropies[rows] = _chunk_entropy(softmax)
    stats = _finish_rows(loss_kind, counted, target, lse, aux, adv, param0, param1)
    return stats if not entropy else (*stats, torch.where(counted, entropies, 0.0))


def backward(rows3d, labels, lse, row_grad, out3d, *, inv_temperature, entropy=None, entropy_grad=None):
    """Write ``(row_grad * (onehot(label) - p) - entropy_grad * p * (log p + entropy)) / T`` (``p`` the softmax;
    the entropy term when ``entropy``/``entropy_grad``, float32 ``(rows,)``, are given) into ``out3d`` (may be
    ``rows3d``); exact 0 rows where labels < 0. ``lse`` is not read: recomputing the softmax in one fused ATen
    pass is cheaper than ``exp(z / T - lse)`` in two."""
    del lse
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    scale = row_grad * inv_temperature
    entropy_scale = None if entropy_grad is None else entropy_grad * inv_temperature
    scratch = _Scratch()
    for (first, chunk), (_, out) in zip(row_chunks(rows3d), row_chunks(out3d), strict=True):
        rows = slice(first, first + chunk.shape[0])
        softmax = _chunk_softmax(chunk, safe_labels[rows], inv_temperature, scratch, _float32_out(out),
                                 keep_shifted=entropy_scale is not None)
        _write_grad(softmax, scale[rows], safe_labels[rows], counted[rows], out,
                    None if entropy is None else entropy[rows], None if entropy_scale is None else entropy_scale[rows])
    return out3d


def forward_grad(rows3d, labels, aux, adv, out3d, row_scale, *, loss_kind, inv_temperature, param0=0.0,
                 param1=0.0, entropy=False, entropy_coef=0.0):
    """`forward`, and the gradient of ``row_scale * sum(loss - entropy_coef * entropy)`` (the entropy term when
    ``entropy``) written into ``out3d`` while each chunk's softmax is at hand (training mode: one softmax of the
    logits instead of two)."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    stats = [torch.zeros(labels.shape, dtype=torch.float32, device=labels.device) for _ in range(4 + entropy)]
    # d(objective)/d(entropy) / T, the same for every row (0 on rows that do not count: their gradient is zeroed).
    entropy_scale = (-entropy_coef * inv_temperature) * row_scale if entropy else None
    scratch = _Scratch()
    for (first, chunk), (_, out) in zip(row_chunks(rows3d), row_chunks(out3d), strict=True):
        rows = slice(first, first + chunk.shape[0])
        softmax = _chunk_softmax(chunk, safe_labels[rows], inv_temperature, scratch, _float32_out(out),
                                 keep_shifted=entropy)
        chunk_stats = _finish_rows(loss_kind, counted[rows], softmax.target, softmax.lse,
                                   aux[rows] if aux.numel() else aux, adv[rows] if adv.numel() else adv, param0, param1)
        if entropy:
            chunk_stats = (*chunk_stats, torch.where(counted[rows], _chunk_entropy(softmax), 0.0))
        for full, part in zip(stats, chunk_stats, strict=True):
            full[rows] = part
        scale = chunk_stats[3] * row_scale * inv_temperature
        _write_grad(softmax, scale, safe_labels[rows], counted[rows], out,
                    chunk_stats[4] if entropy else None,
                    None if entropy_scale is None else entropy_scale.expand(scale.shape))
    return tuple(stats)

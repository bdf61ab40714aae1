"""The PyTorch implementation of the log-prob kernel family: the Triton kernels' two passes in row chunks.

Same contract as ``apa_fast.kernels.logprob.forward`` / ``backward``, for CPUs and as a fallback: at most
one float32 chunk of ``TORCH_CHUNK_BYTES`` exists at a time, never the float32 ``[rows x vocab]`` tensor.
"""

from __future__ import annotations

import torch

from .kinds import KINDS

# Bytes of float32 logits processed at a time.
TORCH_CHUNK_BYTES = 32 * 2**20


def row_chunks(rows3d: torch.Tensor):
    """Yield ``(first_row, chunk (n, V))`` views covering the rows in order, each at most TORCH_CHUNK_BYTES."""
    outer, inner, vocab = rows3d.shape
    step = max(1, TORCH_CHUNK_BYTES // (4 * vocab))
    for o in range(outer):
        plane = rows3d[o]
        for start in range(0, inner, step):
            yield o * inner + start, plane[start:start + step]


def _scaled_float32(chunk: torch.Tensor, inv_temperature: float, *, copy: bool) -> torch.Tensor:
    """``chunk / temperature`` in float32; a fresh buffer when ``copy`` (else possibly ``chunk`` itself)."""
    scaled = chunk.to(torch.float32, copy=copy)
    return scaled.mul_(inv_temperature) if inv_temperature != 1.0 else scaled


def _chunk_lse_and_target(scaled, safe_labels):
    return torch.logsumexp(scaled, dim=-1), scaled.gather(-1, safe_labels[:, None])[:, 0]


def _finish_rows(kind, counted, target, lse, aux, adv, param0, param1):
    """(logp, lse, loss, dlogp) of rows; rows that do not count may hold anything (NaN, inf): `where` keeps
    their values out of every output."""
    zero = torch.zeros((), device=lse.device)
    logp = torch.where(counted, target - lse, zero)
    loss, dlogp = KINDS[kind].epilogue(logp, aux, adv, param0, param1)
    return logp, torch.where(counted, lse, zero), torch.where(counted, loss, zero), torch.where(counted, dlogp, zero)


def _write_grad(scaled, lse, scale, safe_labels, counted, out) -> None:
    """``out = scale * (onehot - softmax)`` from the float32 ``scaled`` chunk, which it overwrites."""
    scaled.sub_(lse[:, None]).exp_().mul_(-scale[:, None])
    scaled.scatter_add_(-1, safe_labels[:, None], scale[:, None])
    if not bool(counted.all()):  # exact zeros whatever the logits of those rows hold; rows only, not the chunk
        scaled[~counted] = 0.0
    out.copy_(scaled)


def forward(rows3d, labels, aux, adv, *, loss_kind, inv_temperature, param0=0.0, param1=0.0):
    """float32 ``(rows,)`` ``(logp, lse, loss, dlogp)`` of ``rows3d (outer, inner, V)``; 0 where labels < 0."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    lse = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    target = torch.empty_like(lse)
    for first, chunk in row_chunks(rows3d):
        rows = slice(first, first + chunk.shape[0])
        scaled = _scaled_float32(chunk, inv_temperature, copy=inv_temperature != 1.0)
        lse[rows], target[rows] = _chunk_lse_and_target(scaled, safe_labels[rows])
    return _finish_rows(loss_kind, counted, target, lse, aux, adv, param0, param1)


def backward(rows3d, labels, lse, row_grad, out3d, *, inv_temperature):
    """Write ``row_grad * (onehot(label) - softmax) / T`` into ``out3d`` (may be ``rows3d``); exact 0 rows
    where labels < 0."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    scale = row_grad * inv_temperature
    for (first, chunk), (_, out) in zip(row_chunks(rows3d), row_chunks(out3d), strict=True):
        rows = slice(first, first + chunk.shape[0])
        # One float32 buffer per chunk, updated in place.
        scaled = _scaled_float32(chunk, inv_temperature, copy=True)
        _write_grad(scaled, lse[rows], scale[rows], safe_labels[rows], counted[rows], out)
    return out3d


def forward_grad(rows3d, labels, aux, adv, out3d, row_scale, *, loss_kind, inv_temperature, param0=0.0,
                 param1=0.0):
    """`forward`, and the gradient of ``row_scale * sum(loss)`` written into ``out3d`` while each chunk is at
    hand (training mode: one float32 conversion of the logits instead of two)."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    stats = [torch.zeros(labels.shape, dtype=torch.float32, device=labels.device) for _ in range(4)]
    for (first, chunk), (_, out) in zip(row_chunks(rows3d), row_chunks(out3d), strict=True):
        rows = slice(first, first + chunk.shape[0])
        scaled = _scaled_float32(chunk, inv_temperature, copy=True)
        lse, target = _chunk_lse_and_target(scaled, safe_labels[rows])
        chunk_stats = _finish_rows(loss_kind, counted[rows], target, lse, aux[rows] if aux.numel() else aux,
                                   adv[rows] if adv.numel() else adv, param0, param1)
        for full, part in zip(stats, chunk_stats, strict=True):
            full[rows] = part
        scale = chunk_stats[3] * row_scale * inv_temperature
        _write_grad(scaled, lse, scale, safe_labels[rows], counted[rows], out)
    return tuple(stats)

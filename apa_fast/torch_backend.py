"""The PyTorch implementation of the log-prob kernel family: the Triton kernels' two passes in row chunks.

Same contract as ``apa_fast.kernels.logprob.forward`` / ``backward``, for CPUs and as a fallback: at most
one float32 chunk of ``TORCH_CHUNK_BYTES`` exists at a time (a few, with the entropy), never the float32
``[rows x vocab]`` tensor. The entropy, when asked for, comes from the same chunk as the log-sum-exp, and its
gradient joins the log-prob's in the same pass.
"""

from __future__ import annotations

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


def _scaled_float32(chunk: torch.Tensor, inv_temperature: float, *, copy: bool) -> torch.Tensor:
    """``chunk / temperature`` in float32; a fresh buffer when ``copy`` (else possibly ``chunk`` itself)."""
    scaled = chunk.to(torch.float32, copy=copy)
    return scaled.mul_(inv_temperature) if inv_temperature != 1.0 else scaled


def _chunk_lse_and_target(scaled, safe_labels, entropy=False):
    """(lse, entropy or None, the labels' scaled logits) of the rows of the float32 ``scaled`` chunk."""
    target = scaled.gather(-1, safe_labels[:, None])[:, 0]
    if not entropy:
        return torch.logsumexp(scaled, dim=-1), None, target
    return *_chunk_lse_and_entropy(scaled), target


def _chunk_lse_and_entropy(scaled):
    """float32 ``(n,)`` (log-sum-exp, ``-sum p log p`` of ``softmax(scaled)``) from one sweep of exponentials, as
    the kernels: relative to the row maximum, ``lse = max + log S`` and ``H = log S - sum(e^u * u) / S`` with
    ``u = z - max``, ``S = sum e^u`` (``lse - sum(p * z)`` would lose ``|lse| * 2**-24`` to cancellation: 1e-3
    at logits of 1e4). -inf columns add nothing; an all -inf row has lse -inf (as torch.logsumexp) and entropy 0."""
    row_max = scaled.amax(-1)
    finite = torch.isfinite(row_max)
    shifted = scaled - torch.where(finite, row_max, 0.0)[:, None]
    weights = shifted.exp()
    log_total = weights.sum(-1).log()
    # One fused dot product per row; the clamp turns 0 * -inf (a -inf column) into 0 * LOGP_FLOOR.
    mean_shift = torch.linalg.vecdot(weights, shifted.clamp_(min=LOGP_FLOOR)) / log_total.exp()
    return row_max + log_total, torch.where(finite, log_total - mean_shift, 0.0)


def _finish_rows(kind, counted, target, lse, aux, adv, param0, param1):
    """(logp, lse, loss, dlogp) of rows; rows that do not count may hold anything (NaN, inf): `where` keeps
    their values out of every output."""
    zero = torch.zeros((), device=lse.device)
    logp = torch.where(counted, target - lse, zero)
    loss, dlogp = KINDS[kind].epilogue(logp, aux, adv, param0, param1)
    return logp, torch.where(counted, lse, zero), torch.where(counted, loss, zero), torch.where(counted, dlogp, zero)


def _write_grad(scaled, lse, scale, safe_labels, counted, out, entropy=None, entropy_scale=None) -> None:
    """``out = scale * (onehot - p) - entropy_scale * p * (log p + entropy)``, ``p = softmax(scaled)``, from the
    float32 ``scaled`` chunk, which it overwrites. ``entropy_scale`` None: no entropy term (and no second buffer)."""
    scaled.sub_(lse[:, None])  # log p
    if entropy_scale is None:
        scaled.exp_().mul_(-scale[:, None])
    else:
        # p * (-(scale + entropy_scale * H) - entropy_scale * log p): one more chunk-sized buffer, p.
        p = scaled.exp()
        offset = scale + entropy_scale * entropy
        scaled.clamp_(min=LOGP_FLOOR).mul_(-entropy_scale[:, None]).sub_(offset[:, None]).mul_(p)
    scaled.scatter_add_(-1, safe_labels[:, None], scale[:, None])
    if not bool(counted.all()):  # exact zeros whatever the logits of those rows hold; rows only, not the chunk
        scaled[~counted] = 0.0
    out.copy_(scaled)


def forward(rows3d, labels, aux, adv, *, loss_kind, inv_temperature, param0=0.0, param1=0.0, entropy=False):
    """float32 ``(rows,)`` ``(logp, lse, loss, dlogp)`` of ``rows3d (outer, inner, V)``, and ``entropy`` fifth
    when asked for; 0 where labels < 0."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    lse = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    target = torch.empty_like(lse)
    entropies = torch.empty_like(lse) if entropy else None
    for first, chunk in row_chunks(rows3d):
        rows = slice(first, first + chunk.shape[0])
        scaled = _scaled_float32(chunk, inv_temperature, copy=inv_temperature != 1.0)
        lse[rows], chunk_entropy, target[rows] = _chunk_lse_and_target(scaled, safe_labels[rows], entropy)
        if entropy:
            entropies[rows] = chunk_entropy
    stats = _finish_rows(loss_kind, counted, target, lse, aux, adv, param0, param1)
    return stats if not entropy else (*stats, torch.where(counted, entropies, 0.0))


def backward(rows3d, labels, lse, row_grad, out3d, *, inv_temperature, entropy=None, entropy_grad=None):
    """Write ``(row_grad * (onehot(label) - p) - entropy_grad * p * (log p + entropy)) / T`` (``p`` the softmax;
    the entropy term when ``entropy``/``entropy_grad``, float32 ``(rows,)``, are given) into ``out3d`` (may be
    ``rows3d``); exact 0 rows where labels < 0."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    scale = row_grad * inv_temperature
    entropy_scale = None if entropy_grad is None else entropy_grad * inv_temperature
    for (first, chunk), (_, out) in zip(row_chunks(rows3d), row_chunks(out3d), strict=True):
        rows = slice(first, first + chunk.shape[0])
        # One float32 buffer per chunk, updated in place.
        scaled = _scaled_float32(chunk, inv_temperature, copy=True)
        _write_grad(scaled, lse[rows], scale[rows], safe_labels[rows], counted[rows], out,
                    None if entropy is None else entropy[rows], None if entropy_scale is None else entropy_scale[rows])
    return out3d


def forward_grad(rows3d, labels, aux, adv, out3d, row_scale, *, loss_kind, inv_temperature, param0=0.0,
                 param1=0.0, entropy=False, entropy_coef=0.0):
    """`forward`, and the gradient of ``row_scale * sum(loss - entropy_coef * entropy)`` (the entropy term when
    ``entropy``) written into ``out3d`` while each chunk is at hand (training mode: one float32 conversion of the
    logits instead of two)."""
    counted = labels >= 0
    safe_labels = torch.where(counted, labels, 0).long()
    stats = [torch.zeros(labels.shape, dtype=torch.float32, device=labels.device) for _ in range(4 + entropy)]
    # d(objective)/d(entropy) / T, the same for every row (0 on rows that do not count: their gradient is zeroed).
    entropy_scale = (-entropy_coef * inv_temperature) * row_scale if entropy else None
    for (first, chunk), (_, out) in zip(row_chunks(rows3d), row_chunks(out3d), strict=True):
        rows = slice(first, first + chunk.shape[0])
        scaled = _scaled_float32(chunk, inv_temperature, copy=True)
        lse, chunk_entropy, target = _chunk_lse_and_target(scaled, safe_labels[rows], entropy)
        chunk_stats = _finish_rows(loss_kind, counted[rows], target, lse, aux[rows] if aux.numel() else aux,
                                   adv[rows] if adv.numel() else adv, param0, param1)
        if entropy:
            chunk_stats = (*chunk_stats, torch.where(counted[rows], chunk_entropy, 0.0))
        for full, part in zip(stats, chunk_stats, strict=True):
            full[rows] = part
        scale = chunk_stats[3] * row_scale * inv_temperature
        _write_grad(scaled, lse, scale, safe_labels[rows], counted[rows], out,
                    chunk_stats[4] if entropy else None,
                    None if entropy_scale is None else entropy_scale.expand(scale.shape))
    return tuple(stats)

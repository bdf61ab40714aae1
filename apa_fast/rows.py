"""Token-row layout and reductions shared by the logits ops (`apa_fast.logprob`) and the linear ops.

Row layout: ``(..., V)`` logits are viewed as ``(outer, inner, V)`` with their own strides, sharing storage,
so that slices such as ``logits[:, :-1]`` reach the kernels without a copy. Reductions turn per-row float32
values into the ops' outputs and give the upstream scale of each row in the backward.
"""

from __future__ import annotations

import torch


def _rows_layout(tensor: torch.Tensor):
    """``((outer, stride_outer), (inner, stride_inner))`` merging the leading dimensions of ``tensor (..., V)``,
    or None when they do not merge into two (or 32-bit column offsets cannot address the vocabulary span)."""
    dims = [(size, stride) for size, stride in zip(tensor.shape[:-1], tensor.stride()[:-1], strict=True) if size != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2 or tensor.shape[-1] * max(tensor.stride(-1), 1) >= 2**31:
        return None
    return [(1, 0)] * (2 - len(merged)) + merged


def needs_copy(tensor: torch.Tensor) -> bool:
    """True when `as_rows3d` has to copy ``tensor`` (its leading dimensions do not merge into two)."""
    return _rows_layout(tensor) is None


def as_rows3d(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor (..., V)`` as ``(outer, inner, V)``, sharing its storage unless `needs_copy`.

    Leading dimensions merge when their strides nest (size-1 dimensions drop out); a slice such as
    ``x[:, :-1]`` of a contiguous ``(B, T, V)`` stays two leading dimensions and is not copied. Three or
    more leading dimensions that cannot merge, or a vocabulary span that 32-bit column offsets cannot
    address, fall back to one contiguous copy.
    """
    layout = _rows_layout(tensor)
    if layout is None:
        return as_rows3d(tensor.contiguous())
    (outer, stride_outer), (inner, stride_inner) = layout
    return tensor.as_strided((outer, inner, tensor.shape[-1]), (stride_outer, stride_inner, tensor.stride(-1)))


def gradient_buffer(rows3d: torch.Tensor) -> torch.Tensor:
    """A new tensor of ``rows3d``'s ``(outer, inner, V)`` shape and dtype, for its gradient, whose rows start at the
    same offsets from a 16-byte boundary as ``rows3d``'s rows (when ``rows3d`` starts 16-byte aligned, as a slice
    such as ``logits[:, :-1]`` does): the kernels' aligned vector loads of a row and stores of its gradient then
    cover the same columns, whatever V (`apa_fast.kernels.logprob._grad_vector`).

    Its strides are the contiguous ones padded by less than 16 bytes a row to ``rows3d``'s row strides modulo 16
    bytes: contiguous for contiguous logits; for ``logits[:, :-1]`` of a ``(B, T, V)`` buffer, ``V mod 8`` bf16
    columns of padding per sequence. They depend on the shape and strides only (fake kernels give the same).
    """
    outer, inner, vocab = rows3d.shape
    vec = 16 // rows3d.element_size()
    if rows3d.stride(2) != 1 and vocab != 1:  # strided rows: no vector accesses to line up
        return torch.empty(rows3d.shape, dtype=rows3d.dtype, device=rows3d.device)
    stride_inner = vocab + (rows3d.stride(1) - vocab) % vec if inner > 1 else vocab
    stride_outer = inner * stride_inner + ((rows3d.stride(0) - inner * stride_inner) % vec if outer > 1 else 0)
    return torch.empty_strided(rows3d.shape, (stride_outer, stride_inner, 1), dtype=rows3d.dtype,
                               device=rows3d.device)


def writable_in_place(tensor: torch.Tensor) -> bool:
    """True when every element of ``tensor`` has its own memory location (no stride-0 or overlapping dims).

    A gradient written in place into overlapping memory would sum rows into each other.
    """
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1)
    extent = 1  # elements spanned by the dimensions already placed
    for stride, size in dims:
        if stride < extent:
            return False
        extent = stride * size
    return True


def denominator(reduction: str, count: torch.Tensor, normalizer: torch.Tensor | None) -> torch.Tensor | None:
    """What a "mean" divides by: ``normalizer`` when given, else the number of counted rows (at least 1)."""
    if reduction != "mean":
        return None
    return normalizer if normalizer is not None else count.clamp(min=1).to(torch.float32)


def reduce_rows(reduction: str, per_row: torch.Tensor, denom: torch.Tensor | None, rows_shape) -> torch.Tensor:
    """float32 ``per_row (rows,)`` (0 on rows that do not count) summed, divided by ``denom``, or shaped back."""
    if reduction == "none":
        return per_row.reshape(rows_shape)
    total = per_row.sum()
    return total if reduction == "sum" else total / denom


def upstream_scale(reduction: str, grad_output: torch.Tensor, denom: torch.Tensor | None) -> torch.Tensor:
    """float32 d(objective)/d(per-row value): a 0-dim tensor for "sum"/"mean", a ``(rows,)`` one for "none"."""
    grad_output = grad_output.float()
    if reduction == "none":
        return grad_output.reshape(-1)
    return grad_output if reduction == "sum" else grad_output / denom

"""Input checks shared by every op: each raises before any kernel runs and names the offending argument.

Checks of shapes, dtypes, devices and Python numbers run on the host and cost nothing. Checks of tensor
*values* (a label out of range at a counted position, a mask value other than 0/1, a tensor normalizer that is
not finite and positive) need one host sync; they
run inside the custom op `apa_fast::token_labels`, which `torch.compile` treats as opaque, so the same
clear error is raised in eager mode and in compiled graphs, without a graph break.
"""

from __future__ import annotations

import numbers

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
# 1/T and T stay normal float32 numbers with room to spare, so scaling never overflows or flushes to zero.
TEMPERATURE_RANGE = (1e-6, 1e6)
# Integer label dtypes whose every value converts to int64 exactly.
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_positive(name: str, value) -> None:
    """``value`` is a finite real number > 0 (bools are refused: ``lam=True`` is a bug, not 1).

    Comparisons only (``v - v == 0`` is False for inf and NaN): under torch.compile a Python number that changes
    between calls becomes symbolic, and comparisons on it are guards where ``math.isfinite`` would not trace.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value - value == 0 and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_temperature(temperature) -> None:
    check_positive("temperature", temperature)
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ValueError(f"temperature must be in [{low:g}, {high:g}], got {temperature!r}")


def check_float_rows(name: str, tensor, last_dim: str) -> None:
    """``tensor`` is a float32/bfloat16/float16 ``(..., last_dim)`` tensor with a non-empty last dimension."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., {last_dim}) with {last_dim} >= 1, got {tuple(tensor.shape)}")


def _check_tensor_on(name, tensor, device, anchor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but {anchor} is on {device}")


def _token_shape_of(anchor: str) -> str:
    """How the token shape derives from the anchor argument: log-probs are per token already."""
    return f"{anchor}.shape" if anchor == "logprobs" else f"{anchor}.shape[:-1]"


def _check_token_shape(name, tensor, rows_shape, anchor) -> None:
    if tuple(tensor.shape) != tuple(rows_shape):
        raise ValueError(f"{name} must have shape {tuple(rows_shape)} ({_token_shape_of(anchor)}), "
                         f"got {tuple(tensor.shape)}")


def check_reduction(reduction, normalizer, device) -> torch.Tensor | None:
    """Validate ``reduction`` and ``normalizer``; returns the normalizer as a float32 0-dim tensor (or None)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only, got reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must be a number or a 0-dim real tensor, got a {normalizer.dtype} tensor "
                             f"of shape {tuple(normalizer.shape)}")
        return normalizer.detach().to(device=device, dtype=torch.float32)
    check_positive("normalizer", normalizer)
    return torch.as_tensor(normalizer, dtype=torch.float32, device=device)


def per_token_floats(name, tensor, rows_shape, device, anchor) -> torch.Tensor:
    """float32 ``(rows,)`` values of a per-token float argument, broadcast from the leading dimensions.

    Accepted shapes for token rows ``(d0, ..., dk)``: the token shape itself, or a prefix of it padded with
    trailing 1s, e.g. ``(B,)`` or ``(B, 1)`` for ``(B, T)`` tokens (one value per sequence).
    """
    _check_tensor_on(name, tensor, device, anchor)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    rows_shape, shape = tuple(rows_shape), tuple(tensor.shape)
    if shape != rows_shape:
        prefix = 0
        while prefix < min(len(shape), len(rows_shape)) and shape[prefix] == rows_shape[prefix]:
            prefix += 1
        if not (1 <= len(shape) <= len(rows_shape) and prefix >= 1 and all(d == 1 for d in shape[prefix:])):
            examples = f"{rows_shape[:1]} or {rows_shape[:1] + (1,)}"
            raise ValueError(f"{name} must have the token shape {rows_shape} ({_token_shape_of(anchor)}) or "
                             f"broadcast to it from the leading dimensions (e.g. {examples}), got {shape}")
        padded = shape[:prefix] + (1,) * (len(rows_shape) - prefix)
        tensor = tensor.reshape(padded).expand(rows_shape)
    return tensor.detach().to(torch.float32).reshape(-1).contiguous()


def token_labels(labels, mask, ignore_index, *, rows_shape, vocab, device, anchor, normalizer=None) -> torch.Tensor:
    """Check ``labels``/``mask`` against ``rows_shape`` token rows of a ``vocab``-way softmax.

    Returns int32 ``(rows,)`` labels, -1 where the row does not count (label == ``ignore_index`` or mask 0).
    Labels are range-checked at counted positions only (a pad id hidden by the mask is fine). A tensor
    ``normalizer`` (float32 0-dim, from `check_reduction`) is checked to be finite and > 0 in the same sync.
    """
    _check_tensor_on("labels", labels, device, anchor)
    _check_token_shape("labels", labels, rows_shape, anchor)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int64, int32, int16, int8 or uint8), got {labels.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if mask is not None:
        _check_tensor_on("mask", mask, device, anchor)
        _check_token_shape("mask", mask, rows_shape, anchor)
        if mask.is_complex():
            raise TypeError(f"mask must be a bool, integer or float tensor of 0/1 values, got {mask.dtype}")
    return _token_labels_op(labels.detach(), None if mask is None else mask.detach(), vocab, int(ignore_index),
                            normalizer)


@torch.library.custom_op("apa_fast::token_labels", mutates_args=())
def _token_labels_op(labels: torch.Tensor, mask: torch.Tensor | None, vocab: int, ignore_index: int,
                     normalizer: torch.Tensor | None = None) -> torch.Tensor:
    labels = labels.long()  # every accepted dtype converts exactly; uint8 no longer wraps in the comparison
    counted = labels != ignore_index
    bad_mask = torch.zeros((), dtype=torch.bool, device=labels.device)
    if mask is not None:
        if mask.dtype != torch.bool:
            bad_mask = ((mask != 0) & (mask != 1)).any()
        counted = counted & (mask != 0)
    out_of_range = counted & ((labels < 0) | (labels >= vocab))
    bad_normalizer = torch.zeros((), dtype=torch.bool, device=labels.device)
    if normalizer is not None:
        bad_normalizer = ~(torch.isfinite(normalizer) & (normalizer > 0)).to(labels.device)
    # One host sync for every value check: a wrong label must never become an out-of-bounds read.
    any_bad_mask, any_bad_label, any_bad_normalizer = torch.stack([bad_mask, out_of_range.any(),
                                                                   bad_normalizer]).tolist()
    if any_bad_normalizer:
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer.item()!r}")
    if any_bad_mask:
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"mask must hold only 0/1 (or bool) values; found {bad}")
    if any_bad_label:
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index} where they count; "
                         f"found {bad}")
    return torch.where(counted, labels, -1).to(torch.int32).reshape(-1)


@_token_labels_op.register_fake
def _(labels, mask, vocab, ignore_index, normalizer=None):
    return labels.new_empty(labels.numel(), dtype=torch.int32)

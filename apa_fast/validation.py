"""Input checks shared by every op: each raises before any kernel runs and names the offending argument.

Checks of shapes, dtypes, devices and Python numbers run on the host and cost nothing. Checks of tensor
*values* (a label out of range at a counted position, a mask value other than 0/1, a tensor normalizer out of
its range) need one host sync; they run inside the custom op `apa_fast::token_labels`, which `torch.compile`
treats as opaque, so the same clear error is raised in eager mode and in compiled graphs, without a graph break.

Number-valued arguments go through `check_number` (integers through `check_integer`) against a `Range` declared
once: the shared ones here, the loss kinds' hyper-parameters in `apa_fast.kinds.HYPER_RANGES`. Every entry
point (the ops, `APALoss`, the TRL/OpenRLHF/verl adapters) calls them.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
# Integer label dtypes whose every value converts to int64 exactly.
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Range(NamedTuple):
    """The accepted values of a number-valued argument, both ends included, and why the ends are there."""

    low: float
    high: float
    reason: str


# The ranges of the arguments every op shares; those of the loss kinds' own hyper-parameters are
# `apa_fast.kinds.HYPER_RANGES`. Each keeps the float32 arithmetic the kernels do on the number finite and
# exact to float32 rounding, so that every accepted value gives the float64 answer on both backends.
TEMPERATURE = Range(1e-6, 1e6, "the float32 kernels scale the logits by 1/temperature, which must stay a normal "
                               "number")
LOGIT_SCALE = Range(1e-6, 1e6, "it scales the projected logits, as 1/temperature does")
LOGIT_SOFTCAP = Range(1e-6, 1e6, "z / logit_softcap and logit_softcap * tanh(...) must stay normal float32 numbers")
# A normal float32 normalizer divides exactly (to rounding): the mean overflows only where its true value does.
NORMALIZER = Range(1e-6, 1e12, "a token count; in float32 it and 1/normalizer, which scales every gradient, must "
                               "stay normal numbers")
INT64 = Range(-2**63, 2**63 - 1, "it is compared with int64 labels")


def check_number(name: str, value, bounds: Range):
    """``value`` as a Python number, once checked to be a real number in ``bounds`` (ends included).

    Python and NumPy ints and floats are accepted; NumPy scalars come back as Python numbers, so that no
    arithmetic on them (``1 / lam``) runs in float16 or float32. Bools are refused (``lam=True`` is a bug, not 1),
    and so are strings and tensors. Comparisons only (NaN fails them, inf is out of every range): under
    torch.compile a Python number that changes between calls becomes symbolic, and comparisons on it are guards
    where ``math.isfinite`` would not trace.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number (an int or float, not a bool), got {value!r}")
    number = value
    if not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):  # NumPy scalars and other Reals
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
    if not bounds.low <= number <= bounds.high:
        raise ValueError(f"{name} must be in [{bounds.low:g}, {bounds.high:g}], got {value!r} ({bounds.reason})")
    return number


def check_integer(name: str, value, bounds: Range = INT64) -> int:
    """``value`` as a Python int, once checked to be a Python or NumPy integer in ``bounds``; bools are refused.
    ValueError, as `check_number` raises for every number-valued argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int (Python or NumPy, not a bool), got {value!r}")
    return check_number(name, value, bounds)


def check_choice(name: str, value, choices: tuple):
    """``value`` itself, once checked to be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


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
    """How the token shape derives from the anchor argument: logits and hidden states have a last dimension
    beyond the tokens; any other anchor (log-probs) is per token already."""
    return f"{anchor}.shape[:-1]" if anchor in ("logits", "hidden") else f"{anchor}.shape"


def _check_token_shape(name, tensor, rows_shape, anchor) -> None:
    if tuple(tensor.shape) != tuple(rows_shape):
        raise ValueError(f"{name} must have shape {tuple(rows_shape)} ({_token_shape_of(anchor)}), "
                         f"got {tuple(tensor.shape)}")


def check_reduction(reduction, normalizer, device) -> torch.Tensor | None:
    """Validate ``reduction`` and ``normalizer``; returns the normalizer as a 0-dim tensor on ``device`` (or None).

    A number is range-checked here (`NORMALIZER`) and becomes float32. A tensor keeps its dtype: `token_labels`
    checks its value in that dtype, so that the error shows the value given (1e300, not the inf of its float32
    conversion); the caller converts it to float32 after that check."""
    check_choice("reduction", reduction, REDUCTIONS)
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError(f"normalizer applies to reduction='mean' only, got reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must be a number or a 0-dim real tensor, got a {normalizer.dtype} tensor "
                             f"of shape {tuple(normalizer.shape)}")
        return normalizer.detach().to(device=device)
    return torch.as_tensor(check_number("normalizer", normalizer, NORMALIZER), dtype=torch.float32, device=device)


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


def check_mask_dtype(mask: torch.Tensor) -> None:
    """``mask`` is a bool, integer or float tensor; its values are checked in a host sync (`check_mask_values`,
    or with the labels inside `apa_fast::token_labels`)."""
    if mask.is_complex():
        raise TypeError(f"mask must be a bool, integer or float tensor of 0/1 values, got {mask.dtype}")


def check_mask_values(mask: torch.Tensor) -> None:
    """A non-bool ``mask`` holds only 0 and 1 (NaN refused), with the loss ops' error: one host sync (none for a
    bool mask), for an op with no other value to check (`apa_fast.gae`)."""
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise _mask_values_error(mask)


def _mask_values_error(mask: torch.Tensor) -> ValueError:
    bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
    return ValueError(f"mask must hold only 0/1 (or bool) values; found {bad}")


def token_labels(labels, mask, ignore_index, *, rows_shape, vocab, device, anchor, normalizer=None) -> torch.Tensor:
    """Check ``labels``/``mask`` against ``rows_shape`` token rows of a ``vocab``-way softmax.

    Returns int32 ``(rows,)`` labels, -1 where the row does not count (label == ``ignore_index`` or mask 0).
    Labels are range-checked at counted positions only (a pad id hidden by the mask is fine). A tensor
    ``normalizer`` (0-dim, from `check_reduction`) is checked to be in the `NORMALIZER` range in the same sync.
    """
    _check_tensor_on("labels", labels, device, anchor)
    _check_token_shape("labels", labels, rows_shape, anchor)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int64, int32, int16, int8 or uint8), got {labels.dtype}")
    ignore_index = check_integer("ignore_index", ignore_index)
    if mask is not None:
        _check_tensor_on("mask", mask, device, anchor)
        _check_token_shape("mask", mask, rows_shape, anchor)
        check_mask_dtype(mask)
    return _token_labels_op(labels.detach(), None if mask is None else mask.detach(), vocab, ignore_index,
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
        # In the tensor's own dtype (NaN fails both comparisons); in range, its float32 conversion is finite.
        low, high, _ = NORMALIZER
        bad_normalizer = ~((normalizer >= low) & (normalizer <= high)).to(labels.device)
    # One host sync for every value check: a wrong label must never become an out-of-bounds read.
    any_bad_mask, any_bad_label, any_bad_normalizer = torch.stack([bad_mask, out_of_range.any(),
                                                                   bad_normalizer]).tolist()
    if any_bad_normalizer:
        raise ValueError(f"normalizer must be in [{NORMALIZER.low:g}, {NORMALIZER.high:g}], got {normalizer.item()!r} "
                         f"(a {normalizer.dtype} tensor; {NORMALIZER.reason})")
    if any_bad_mask:
        raise _mask_values_error(mask)
    if any_bad_label:
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index} where they count; "
                         f"found {bad}")
    return torch.where(counted, labels, -1).to(torch.int32).reshape(-1)


@_token_labels_op.register_fake
def _(labels, mask, vocab, ignore_index, normalizer=None):
    return labels.new_empty(labels.numel(), dtype=torch.int32)

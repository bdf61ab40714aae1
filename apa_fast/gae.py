"""Generalized advantage estimation for a whole batch in one call: `gae`.

GAE is a reverse linear recurrence over each row. The compiled kernels (`apa_fast._C`, installed or built
just in time: CUDA, and C++ with OpenMP on the CPU) run it in one pass; the pure-PyTorch path here runs it
without a per-timestep loop: masked-out positions are squeezed out of every row, then the discounted suffix
sum is taken by doubling.
"""

from __future__ import annotations

import torch

from ._dispatch import pick_gae_backend
from .validation import Range, check_mask_dtype, check_mask_values, check_number

__all__ = ["gae"]

# gamma and lam: every weight of the recurrence is then a power of gamma * lam in [0, 1], finite at any length.
COEFFICIENT = Range(0.0, 1.0, "the recurrence weights each later step by powers of gamma * lam, which must not grow")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0,
        lam: float = 0.95, whiten: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of a batch of rows, by generalized advantage estimation.

    Args:
        rewards, values: ``(B, T)`` float tensors (float32 or float64; bfloat16 and float16 are computed in
            float32), on the same device.
        mask: optional ``(B, T)`` tensor, bool or integer/float holding only 0 and 1 (1 = valid): the response
            tokens. Without it every position is valid. A non-bool mask is value-checked with one host sync.
        gamma, lam: the discount and GAE's lambda, each a real number in [0, 1] (Python or NumPy; not a bool).
        whiten: whiten the advantages over all valid positions of the batch, ``(A - mean) / (std + 1e-8)``
            with the unbiased std (0 with fewer than two valid positions); returns keep the raw advantages.
        backend: "cuda" (the CUDA kernel, CUDA tensors), "cpu" (the C++ kernel, CPU tensors), "torch" (pure
            PyTorch, any device) or "auto" (the compiled kernel for the tensors' device if it is available, else
            torch). When `pip install` carried no `apa_fast._C`, "auto", "cpu" and "cuda" build it just in time
            on first use (once per environment, cached; see README "Install").

    Per row the recurrence runs backwards over the valid positions only, skipping masked-out ones (right or
    left padding, holes): for consecutive valid positions t < t', ``delta_t = r_t + gamma * V_t' - V_t`` and
    ``A_t = delta_t + gamma * lam * A_t'``, with ``V`` and ``A`` taken as 0 after the last valid position.

    Returns:
        ``(advantages, returns)``, each ``(B, T)`` float32 (float64 for float64 inputs), contiguous, on the
        inputs' device; ``returns = advantages + values`` (unwhitened). Both are 0 at masked-out positions.
        They carry no gradient: rewards and values are read as data (the compiled op sits outside autograd).

    Under ``torch.compile(fullgraph=True)`` everything after the argument checks is one op,
    ``apa_fast::gae_dispatch``, with a fake kernel: no graph break, and the backend is picked (the extension
    loaded or built) when it runs, as in eager, so an explicit backend that cannot run raises the same
    RuntimeError. A bad tensor or coefficient fails the trace instead, with the eager message inside Dynamo's.

    Raises:
        ValueError: a tensor is not 2-D, the shapes or devices differ, gamma or lam is not a number in [0, 1], a
            mask value is not 0/1 (NaN included; raised when the op runs, as the loss ops raise it), or the
            backend is unknown. TypeError: rewards or values are not floating point, or the mask is complex.
            RuntimeError: the backend asked for cannot run here (the message says why).
    """
    gamma, lam = _check_inputs(rewards, values, mask, gamma, lam)
    arguments = (rewards.detach(), values.detach(), None if mask is None else mask.detach(), float(gamma),
                 float(lam), bool(whiten), backend)
    # Eager calls skip the op's dispatcher round trip, and the Dynamo import its first call makes (~0.8 s).
    return _gae_op(*arguments) if torch.compiler.is_compiling() else _gae_dispatch(*arguments)


def _gae_dispatch(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float,
                  whiten: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the host-side checks: the mask's values (one sync, inside the op under torch.compile, as
    `apa_fast::token_labels` checks the loss ops' masks), the backend picked (the extension loaded or built), run."""
    if mask is not None:
        check_mask_values(mask)
    chosen = pick_gae_backend(backend, rewards.device)
    input_dtype = torch.promote_types(rewards.dtype, values.dtype)  # the kernels read 16-bit inputs as they are
    rewards, values = rewards.to(input_dtype), values.to(input_dtype)
    valid = None if mask is None else mask.bool()
    if chosen == "torch":
        return _gae_torch(rewards, values, valid, gamma, lam, whiten)
    return torch.ops.apa_fast.gae(rewards, values, valid, gamma, lam, whiten)


# `_gae_dispatch` as one op for torch.compile: it sees `gae` whole through the fake kernel, and the backend is
# picked (the extension loaded or built) when the op runs, as in eager, not while tracing.
_gae_op = torch.library.custom_op("apa_fast::gae_dispatch", mutates_args=())(_gae_dispatch)


@_gae_op.register_fake
def _gae_op_fake(rewards, values, mask, gamma, lam, whiten, backend):
    return _empty_outputs(rewards, torch.promote_types(rewards.dtype, values.dtype))


def gae_fake(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float,
             whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake kernel of the compiled op `torch.ops.apa_fast.gae` (registered by `_dispatch` when the extension
    loads): the outputs' metadata, ``(B, T)`` contiguous float32 (float64 for float64 inputs).

    Neither op has an autograd formula: their outputs never require grad (`gae` detaches its inputs, and the
    compiled op sits outside autograd: GAE's rewards and values are data, not parameters)."""
    return _empty_outputs(rewards, rewards.dtype)


def _empty_outputs(rewards: torch.Tensor, input_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _compute_dtype(input_dtype)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _check_inputs(rewards, values, mask, gamma, lam) -> tuple[float, float]:
    """The host-side checks (no sync); returns gamma and lam as Python numbers."""
    tensors = {"rewards": rewards, "values": values, **({} if mask is None else {"mask": mask})}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D (B, T), got shape {tuple(rewards.shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, "
                             f"got {tuple(tensor.shape)}")
        if tensor.device != rewards.device:
            raise ValueError(f"{name} must be on the device of rewards ({rewards.device}), got {tensor.device}")
    for name in ("rewards", "values"):
        if not tensors[name].is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensors[name].dtype}")
    if mask is not None:
        check_mask_dtype(mask)
    return check_number("gamma", gamma, COEFFICIENT), check_number("lam", lam, COEFFICIENT)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gae_torch(rewards, values, valid, gamma: float, lam: float, whiten: bool):
    """The pure-PyTorch path: squeeze each row's valid positions to its front, run the dense recurrence there."""
    dtype = _compute_dtype(rewards.dtype)
    rewards, values = rewards.to(dtype).contiguous(), values.to(dtype).contiguous()
    if valid is None:
        advantages = _dense_advantages(rewards, values, gamma, lam)
        return _whitened(advantages, None) if whiten else advantages, advantages + values
    # slot[b, t]: where valid position t lands in its compacted row (cumsum keeps the order; a stable sort
    # would too, at O(T log T)). Masked-out positions go to a spare last column that is dropped.
    slot = valid.long().cumsum(dim=1) - 1
    target = torch.where(valid, slot, valid.shape[1])
    compact_rewards = _scatter_into_zeros(rewards, target)
    compact_values = _scatter_into_zeros(values, target)
    # Past each row's last valid slot the compacted rewards and values are 0, so the dense recurrence sees
    # "next value 0, next advantage 0" there, as the semantics ask.
    compact_advantages = _dense_advantages(compact_rewards, compact_values, gamma, lam)
    zero = rewards.new_zeros(())
    advantages = torch.where(valid, compact_advantages.gather(1, slot.clamp(min=0)), zero)
    returns = torch.where(valid, advantages + values, zero)
    return _whitened(advantages, valid) if whiten else advantages, returns


def _scatter_into_zeros(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``out[b, target[b, t]] = source[b, t]`` into a zero ``(B, T)`` tensor; target == T is discarded."""
    out = source.new_zeros(source.shape[0], source.shape[1] + 1)
    return out.scatter_(1, target, source)[:, :-1]


def _dense_advantages(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE over rows where every position is valid: ``A_t = sum_k (gamma * lam)^k delta_(t+k)``."""
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    deltas = rewards + gamma * next_values - values
    return _discounted_suffix_sum(deltas, gamma * lam)


def _discounted_suffix_sum(x: torch.Tensor, decay: float) -> torch.Tensor:
    """``y_t = sum_(k >= t) decay^(k - t) x_k`` along dim 1, in ceil(log2 T) elementwise steps.

    Doubling: after the step of span s, y_t holds the sum over [t, t + 2s). Every weight is a power of
    decay in [0, 1], so nothing overflows at any T (decay 0 and 1 included), and each output is a sum of
    about log2(T) rounded terms.
    """
    total = x
    span = 1
    while span < x.shape[1]:
        doubled = total.clone()
        doubled[:, :-span].add_(total[:, span:], alpha=decay**span)
        total = doubled
        span *= 2
    return total


def _whitened(advantages: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(A - mean) / (std + 1e-8)`` over the valid positions (unbiased std, 0 below two), 0 elsewhere."""
    weights = torch.ones_like(advantages) if valid is None else valid.to(advantages.dtype)
    count = weights.sum()
    mean = (advantages * weights).sum() / count.clamp(min=1)
    variance = ((advantages - mean).square() * weights).sum() / (count - 1).clamp(min=1)
    return (advantages - mean) / (variance.sqrt() + 1e-8) * weights

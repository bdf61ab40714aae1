"""The unfused PyTorch versions of every op: plain code, written the way a trainer writes it today.

They are the benchmark baseline (`torch` provider) and the test oracle's sibling (the tests run them in
float64); the per-token formulas are the registry's (`apa_fast.kinds`), written there once. They materialise
the float32 ``[tokens x vocab]`` log-softmax and its gradient; the fused paths in `apa_fast.loss` compute the
same numbers without doing so.

Shapes: ``logits (..., V)``; ``labels``, ``mask``, ``ref_logprobs``, ``old_logprobs``, ``advantages`` ``(...)``.
"""

from __future__ import annotations

import torch

from . import kinds


def _counted(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    return valid


def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100):
    """float32 ``(...)``: ``log_softmax(logits / temperature)[label]``, 0 where ``label == ignore_index``."""
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked * valid


def _reduce(per_token, valid, reduction):
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def _kind_loss(kind, logits, labels, aux, advantages, mask, *, temperature, ignore_index, reduction, **hyper):
    valid = _counted(labels, mask, ignore_index)
    logp = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    aux = None if aux is None else aux.float()
    return _reduce(kind.reference(logp, aux, advantages.float(), **hyper), valid, reduction)


def apa_loss(logits, labels, ref_logprobs, advantages, mask=None, *, lam=1.0, temperature=1.0,
             ignore_index=-100, reduction="mean"):
    """APA: ``(logp - ref_logprobs - advantages / lam) ** 2`` over counted tokens."""
    return _kind_loss(kinds.APA, logits, labels, ref_logprobs, advantages, mask, temperature=temperature,
                      ignore_index=ignore_index, reduction=reduction, lam=lam)


def ppo_loss(logits, labels, old_logprobs, advantages, mask=None, *, clip_eps=0.2, temperature=1.0,
             ignore_index=-100, reduction="mean"):
    """PPO's clipped surrogate: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``, ratio to the sampler."""
    return _kind_loss(kinds.PPO, logits, labels, old_logprobs, advantages, mask, temperature=temperature,
                      ignore_index=ignore_index, reduction=reduction, clip_eps=clip_eps)


def awr_loss(logits, labels, advantages, mask=None, *, lam=1.0, max_weight=20.0, temperature=1.0,
             ignore_index=-100, reduction="mean"):
    """AWR: ``-min(exp(advantages / lam), max_weight) * logp`` (the weight is data, not differentiated)."""
    return _kind_loss(kinds.AWR, logits, labels, None, advantages, mask, temperature=temperature,
                      ignore_index=ignore_index, reduction=reduction, lam=lam, max_weight=max_weight)


def gae_loop(rewards, values, mask=None, *, gamma, lam):
    """GAE with a Python loop over time steps, the way trlX and OpenRLHF write it: the benchmark baseline.

    ``rewards``, ``values``, ``mask`` ``(B, T)``. The mask only zeroes rewards and values, so this agrees
    with `apa_fast.gae` at the valid positions of right-padded rows (or without a mask), not with left
    padding or holes, and leaves nonzero advantages at padded positions.
    """
    if mask is not None:
        rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    running = 0.0
    reversed_advantages = []
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values

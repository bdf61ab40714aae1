"""The plain eager PyTorch code RLHF trainers write for the log-prob losses: the benchmarks' baseline.

What TRL, OpenRLHF and verl users run without a fused kernel: ``log_softmax`` in float32, ``gather`` of the
label, the loss formula, a masked mean. No temperature division, no ``torch.where`` guards for ignored
labels (every label here is a valid token id), no per-op dtype juggling: `apa_fast.reference` does those
and stays the test oracle's sibling, not the baseline (it takes 1.6-1.8 times as long on CPU).
``torch.compile`` of these same functions is the compiled baseline (`compiled`).

Shapes: ``logits (N, V)`` any float dtype; ``labels (N,)`` int64 in ``[0, V)``; per-token float32 ``(N,)``;
``mask (N,)`` bool or None.
"""

from __future__ import annotations

import functools

import torch


def logprobs(logits, labels):
    """float32 ``(N,)``: ``log_softmax(logits.float())[label]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def masked_mean(per_token, mask):
    if mask is None:
        return per_token.mean()
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def apa_loss(logits, labels, ref_logprobs, advantages, mask=None, *, lam):
    """APA: ``mean((logp - ref_logprobs - advantages / lam) ** 2)``."""
    return masked_mean((logprobs(logits, labels) - ref_logprobs - advantages / lam).square(), mask)


def ppo_loss(logits, labels, old_logprobs, advantages, mask=None, *, clip_eps):
    """PPO's clipped surrogate, as TRL's and OpenRLHF's PolicyLoss write it."""
    return ppo_from_logprobs(logprobs(logits, labels), old_logprobs, advantages, mask, clip_eps=clip_eps)


def ppo_from_logprobs(logp, old_logprobs, advantages, mask=None, *, clip_eps):
    ratio = (logp - old_logprobs).exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return masked_mean(surrogate, mask)


@functools.cache
def compiled(name: str):
    """``torch.compile`` (static shapes, as a fixed-length trainer gets) of one of the functions above."""
    # Each benchmarked shape gets its own graph: raise dynamo's recompilation limit above the grid's size.
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    return torch.compile(globals()[name], dynamic=False)

"""Critic-free advantages (``advantage_estimator: group``): each prompt's responses baseline one another.

A rollout samples ``k = samples_per_prompt`` responses per prompt, the ``k`` of a prompt in consecutive rows;
a response's advantage is its score against its group's, constant over its tokens:

- ``mean``: ``s - mean(group)``;
- ``grpo``: ``(s - mean(group)) / (std(group) + 1e-4)`` (GRPO, Shao et al. 2024; TRL's unbiased std and eps);
- ``rloo``: ``s - mean(group without s)`` (RLOO, Ahmadian et al. 2024), which is ``k / (k - 1)`` times ``mean``'s.
"""

from __future__ import annotations

import torch

from .config import GROUP_ADVANTAGES

GRPO_EPS = 1e-4


def group_advantages(scores: torch.Tensor, group_size: int, form: str) -> torch.Tensor:
    """float32 ``(N,)`` advantages of ``scores`` ``(N,)`` (any float dtype), ``N`` a multiple of ``group_size``.

    Equivalent PyTorch code for ``form="rloo"``::

        g = scores.view(-1, k)
        (g - (g.sum(-1, keepdim=True) - g) / (k - 1)).flatten()
    """
    if form not in GROUP_ADVANTAGES:
        raise ValueError(f"form must be one of {GROUP_ADVANTAGES}, got {form!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one is its own baseline), got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be 1-D with a multiple of group_size ({group_size}) entries, got shape "
                         f"{tuple(scores.shape)}")
    groups = scores.double().view(-1, group_size)
    if form == "rloo":
        advantages = groups - (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    else:
        advantages = groups - groups.mean(-1, keepdim=True)
        if form == "grpo":
            advantages = advantages / (groups.std(-1, keepdim=True) + GRPO_EPS)
    return advantages.flatten().float()

"""Other libraries' log-prob, fused-linear and GAE code as benchmark providers (the ``bench`` extra).

Imported where installed (a provider whose package is absent is skipped, never required):

* ``trl``: TRL's ``selective_log_softmax`` (trl.trainer.utils; per first-dimension row: float32 logits take
  ``logits - logsumexp`` in float32, bf16 logits a bf16 ``log_softmax``, so bf16 log-probs come back bf16);
* ``liger``: Liger-Kernel's chunked fused-linear GRPO loss (``LigerFusedLinearGRPOLoss``, pure torch, runs on
  CPU): the clipped PPO surrogate from hidden states, ``beta=0`` (no KL term), ``loss_type="bnpo"`` (the mean
  over counted tokens);
* ``cce``: cut-cross-entropy's ``linear_cross_entropy`` (Triton; its ``torch_compile`` implementation on CPU).

Reimplemented, because their packages do not import without Ray, vLLM and more. Each function below was
rewritten from the source of the named release on PyPI (the wheels ``verl-0.9.1-py3-none-any.whl`` and
``openrlhf-0.11.2-cp311-cp311-manylinux1_x86_64.whl``) to reproduce its arithmetic operation for operation,
not copied; the file and function are named on each:

* ``verl``: ``verl/utils/torch_functional.py::logprobs_from_logits`` without flash-attn (its
  ``logprobs_from_logits_v2``) and ``verl/trainer/ppo/core_algos.py::compute_gae_advantage_return``;
* ``openrlhf``: ``openrlhf/models/utils.py::log_probs_from_logits`` without flash-attn and
  ``openrlhf/trainer/ppo_utils/experience_maker.py::get_advantages_and_returns``.

Log-prob providers take ``logits (B, T, V)`` and ``labels (B, T)`` as those trainers pass them.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

VERSIONS = {"verl": "0.9.1", "openrlhf": "0.11.2"}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ----------------------------------------------------------------------------------------------------
# Log-probs of the labels.
# ----------------------------------------------------------------------------------------------------
def trl_logprobs(logits, labels):
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, labels)


def _per_row_log_softmax(logits, labels):
    """The low-precision branch verl, OpenRLHF and TRL share: ``log_softmax`` in the logits' dtype, one
    first-dimension row at a time (to bound the peak), then gather: log-probs in the logits' dtype."""
    rows = [F.log_softmax(row, dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
            for row, row_labels in zip(logits, labels, strict=True)]
    return torch.stack(rows)


def verl_logprobs(logits, labels):
    """verl 0.9.1 ``logprobs_from_logits_v2``: float32 gathers and subtracts a per-row ``logsumexp``."""
    if logits.dtype not in (torch.float32, torch.float64):
        return _per_row_log_softmax(logits, labels)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def openrlhf_logprobs(logits, labels, chunk_size=1024):
    """OpenRLHF 0.11.2 ``log_probs_from_logits`` (temperature 1): float32 subtracts a ``logsumexp`` taken
    over chunks of 1,024 flattened rows into a buffer of the logits' dtype."""
    if logits.dtype not in (torch.float32, torch.float64):
        return _per_row_log_softmax(logits, labels)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    lse = torch.zeros(flat.shape[0], device=logits.device, dtype=logits.dtype)
    for start in range(0, flat.shape[0], chunk_size):
        lse[start:start + chunk_size] = torch.logsumexp(flat[start:start + chunk_size], dim=-1)
    return picked - lse.view(picked.shape)


LOGPROBS = {"trl": (trl_logprobs, "trl"), "verl": (verl_logprobs, None), "openrlhf": (openrlhf_logprobs, None)}


def logprob_providers() -> dict:
    """``{name: fn(logits (B, T, V), labels (B, T)) -> log-probs (B, T)}`` of the peers available here."""
    return {name: fn for name, (fn, package) in LOGPROBS.items() if package is None or installed(package)}


# ----------------------------------------------------------------------------------------------------
# From hidden states.
# ----------------------------------------------------------------------------------------------------
def liger_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, bias=None, clip_eps=0.2):
    """Liger's fused-linear GRPO loss as the clipped PPO surrogate: ``hidden (B, T, H)``, per-token ``(B, T)``,
    ``advantages (B,)`` or ``(B, T)`` as Liger accepts them."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=clip_eps, epsilon_high=clip_eps,
                                       loss_type="bnpo", compiled=False)
    loss, _ = loss_fn(hidden, weight, labels, mask.long(), advantages, bias=bias, old_per_token_logps=old_logprobs)
    return loss


def cce_logprobs(hidden, weight, labels):
    """cut-cross-entropy's per-token ``-cross_entropy`` = the labels' log-probs from hidden states (it takes no
    bias)."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)


# ----------------------------------------------------------------------------------------------------
# GAE, (B, T) float tensors and a 0/1 mask.
# ----------------------------------------------------------------------------------------------------
def verl_gae(rewards, values, mask, *, gamma, lam):
    """verl 0.9.1 ``compute_gae_advantage_return`` without its final whitening: the recurrence steps over
    masked positions (observation tokens), carrying the next value and advantage across them."""
    mask = mask.to(values.dtype)
    next_value, last = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(rewards.shape[1])):
        here = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        next_value = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        last = here * mask[:, t] + (1 - mask[:, t]) * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def openrlhf_gae(rewards, values, mask, *, gamma, lam):
    """OpenRLHF 0.11.2 ``get_advantages_and_returns``: rewards and values zeroed where masked, then the plain
    recurrence over every position (a hole in the mask is a step with zero reward and value)."""
    values, rewards = mask * values, mask * rewards
    last, reversed_advantages = 0.0, []
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t < steps - 1 else 0.0
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


GAE = {"verl": verl_gae, "openrlhf": openrlhf_gae}

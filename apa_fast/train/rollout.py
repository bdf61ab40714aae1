"""Rollout: sample responses, score them, and turn the scores into per-token advantages and returns.

Sequence layout (B rows): ``[left-padded prompt (P) | response (R), right-padded]``. Every per-token tensor
of a rollout is ``(B, R)``: position ``t`` is the response token ``t``, scored by the model at ``P - 1 + t``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

import apa_fast

from .advantages import group_advantages
from .config import TrainConfig
from .data import left_pad
from .models import position_ids
from .rewards import RewardFn, score

IGNORE = -100


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long: 0 on the prompt's left padding and after the response's end
    response_mask: torch.Tensor  # (B, R) bool: response tokens up to and including the end-of-text token
    logprobs: torch.Tensor  # (B, R) float32: the sampling policy's
    ref_logprobs: torch.Tensor  # (B, R) float32: pi_init's
    values: torch.Tensor  # (B, R) float32: the critic's at sampling time (0 without a critic)
    rewards: torch.Tensor  # (B, R) float32: the score on the last response token (+ PPO's KL penalty)
    advantages: torch.Tensor  # (B, R) float32, whitened when configured
    returns: torch.Tensor  # (B, R) float32: unwhitened advantages + values (0 without a critic)
    scores: torch.Tensor  # (B,) float32: the reward function's

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def labels(self) -> torch.Tensor:
        """``(B, R)`` response token ids with IGNORE where the mask is off."""
        response = self.input_ids[:, self.prompt_len:]
        return torch.where(self.response_mask, response, IGNORE)

    def rows(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (the tensor itself in a single process); NCCL gets a CUDA copy."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return tensor
    on_gpu = torch.distributed.get_backend() == "nccl"
    reduced = tensor.to(torch.device("cuda", torch.cuda.current_device())) if on_gpu else tensor.clone()
    torch.distributed.all_reduce(reduced)
    return reduced.to(tensor.device)


def response_mask(response: torch.Tensor, tokenizer, stop: list[str]) -> torch.Tensor:
    """``(B, R)`` bool: the tokens generated up to and including the first end-of-text token.

    `generate` pads a finished row with the pad token; when that is also the end-of-text token, the first
    one is counted only if the model emitted it, not if it pads after a stop string.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ended = (response == eos) | (response == pad)
    mask = (ended.long().cumsum(-1) - ended.long()) == 0  # nothing ended before this token
    first_end = torch.where(ended.any(-1), ended.long().argmax(-1), response.shape[1])
    for row, end in enumerate(first_end.tolist()):
        if end >= response.shape[1]:
            continue
        padded_after_stop = stop and tokenizer.decode(response[row, :end]).endswith(tuple(stop))
        if padded_after_stop or (response[row, end] == pad and pad != eos):
            mask[row, end] = False
    return mask


def place_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, R)`` float32: each row's score on its last response token, 0 elsewhere (no KL term in APA)."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    last = mask.long().sum(-1).clamp(min=1) - 1  # valid tokens are contiguous from the response's start
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = scores.to(rewards.device)
    return rewards * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, center: bool = True) -> torch.Tensor:
    """``(values - mean) / std`` over the masked-in entries of all processes (0 elsewhere); ``center=False``
    only divides by the std (group advantages: their zero is each group's baseline, kept)."""
    weights = mask.double()
    stats = torch.stack([(values * weights).sum(), (values.square() * weights).sum(), weights.sum()])
    total, total_sq, count = all_reduce_sum(stats.double()).tolist()
    mean = total / max(count, 1.0)
    var = max(total_sq / max(count, 1.0) - mean * mean, 0.0)
    return (values - (mean if center else 0.0)) * (var + eps) ** -0.5 * mask


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both ``(B, R)`` float32, 0 outside ``mask``.

    GAE: `apa_fast.gae` with the critic's ``values``. Group (no critic): each row's return (the sum of its
    rewards: the score, and PPO's KL penalty) against its group's (`group_advantages`), the same on every token
    of the row; returns are 0 (no critic fits them). Whitened over all processes when configured.
    """
    if cfg.has_critic:
        advantages, returns = apa_fast.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.gae_lambda)
    else:
        per_row = group_advantages(rewards.sum(-1), cfg.group_size, cfg.group_advantage).to(mask.device)
        advantages, returns = per_row[:, None] * mask, torch.zeros_like(rewards)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask, center=cfg.has_critic)
    return advantages * mask, returns * mask


def response_hidden(lm, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
    """``(B, R, H)`` last hidden states of a causal LM at the positions that score the response tokens."""
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask)).last_hidden_state
    return hidden[:, prompt_len - 1 : -1]


def response_logits(lm, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
    """``(B, R, V)`` logits of a causal LM at the positions that score the response tokens."""
    return lm.get_output_embeddings()(response_hidden(lm, input_ids, attention_mask, prompt_len))


def token_logprobs(cfg: TrainConfig, lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   model: torch.nn.Module | None = None):
    """float32 ``(B, R)`` log-probs of ``labels`` from hidden states ``(B, R, H)`` and the lm_head module.

    With ``cfg.fused_lm_head`` the lm_head projection is fused into the log-softmax
    (`apa_fast.linear_logprobs`): the ``(B, R, V)`` logits never exist. Under ZeRO-3 the lm_head weight is
    gathered for it; ``model`` is the DeepSpeed-wrapped module that owns it (see `apa_fast.zero3.gathered`).
    """
    common = dict(temperature=cfg.logprob_temperature, ignore_index=IGNORE, backend=cfg.loss_backend)
    if not cfg.fused_lm_head:
        return apa_fast.logprobs(lm_head(hidden), labels, **common)
    with apa_fast.zero3.gathered(lm_head.weight, lm_head.bias, model=model):
        return apa_fast.linear_logprobs(hidden, lm_head.weight, labels, bias=lm_head.bias, **common)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, tokenizer, cfg: TrainConfig, synced_gpus: bool) -> torch.Tensor:
    """``(B, max_new_tokens)`` sampled response ids, right-padded with the pad token."""
    options = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   synced_gpus=synced_gpus)
    if cfg.temperature > 0:
        options.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    if cfg.stop:
        options.update(stop_strings=cfg.stop, tokenizer=tokenizer)
    model.eval()
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **options)
    response = out[:, prompt_ids.shape[1]:]
    missing = cfg.max_new_tokens - response.shape[1]  # generation stops early when every row has ended
    return torch.nn.functional.pad(response, (0, missing), value=tokenizer.pad_token_id)


class KLController:
    """PPO's KL penalty coefficient: fixed at ``ppo_kl_coef``, or adaptive with ``ppo_adaptive_kl``.

    The adaptive form is Ziegler et al. 2019 (the controller of the APA authors' trlx PPO baseline): after each
    rollout of ``n`` sequences with mean KL ``kl`` (nats per sequence),
    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``. It starts at ``ppo_kl_coef``; the
    coefficient is part of the run's state (checkpointed, logged as ``kl_coef``).
    """

    def __init__(self, cfg: TrainConfig, value: float | None = None):
        self.value = cfg.ppo_kl_coef if value is None else value
        self.adaptive, self.target, self.horizon = cfg.ppo_adaptive_kl, cfg.ppo_kl_target, cfg.ppo_kl_horizon

    def update(self, kl: float, n_sequences: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_sequences / self.horizon


@torch.no_grad()
def make_rollout(actor_critic, pi_init, reward_fn: RewardFn, tokenizer, prompts: list[list[int]],
                 cfg: TrainConfig, synced_gpus: bool = False, kl_coef: float | None = None) -> Rollout:
    """Sample ``cfg.group_size`` responses per prompt (consecutive rows), score them, and compute log-probs,
    values (with a critic), rewards and advantages.

    ``kl_coef``: PPO's KL penalty coefficient for this rollout (the `KLController`'s); None: ``cfg.ppo_kl_coef``.
    """
    device = next(actor_critic.parameters()).device
    prompts = [prompt for prompt in prompts for _ in range(cfg.group_size)]
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompts, tokenizer.pad_token_id))
    response = sample(actor_critic.policy, prompt_ids, prompt_mask, tokenizer, cfg, synced_gpus)
    mask = response_mask(response, tokenizer, cfg.stop)
    input_ids = torch.cat([prompt_ids, response], 1)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    prompt_len = prompt_ids.shape[1]
    labels = torch.where(mask, response, IGNORE)

    hidden, values = actor_critic(input_ids, attention_mask, position_ids(attention_mask))
    logprobs = token_logprobs(cfg, actor_critic.lm_head, hidden[:, prompt_len - 1 : -1], labels, actor_critic)
    values = torch.zeros_like(logprobs) if values is None else values[:, prompt_len - 1 : -1] * mask
    ref_hidden = response_hidden(pi_init, input_ids, attention_mask, prompt_len)
    ref_logprobs = token_logprobs(cfg, pi_init.get_output_embeddings(), ref_hidden, labels)

    texts = tokenizer.batch_decode(torch.where(mask, response, tokenizer.pad_token_id), skip_special_tokens=True)
    prompt_texts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    scores = score(reward_fn, prompt_texts, texts).to(device)
    rewards = place_rewards(scores, mask)
    if cfg.algo == "ppo":  # PPO's per-token KL penalty; APA's anchor is in its loss instead
        coef = cfg.ppo_kl_coef if kl_coef is None else kl_coef
        rewards = rewards - coef * (logprobs - ref_logprobs) * mask
    advantages, returns = advantages_and_returns(rewards, values, mask, cfg)
    return Rollout(input_ids, attention_mask, mask, logprobs, ref_logprobs, values, rewards, advantages, returns,
                   scores)

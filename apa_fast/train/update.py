"""Update: ``ppo_epochs`` passes over a rollout in minibatches, policy loss + value loss, one optimizer step each.

Losses are sums over the minibatch's response tokens divided by the token count of the whole minibatch over
all processes, times the world size (DeepSpeed averages gradients over processes): the gradient is then the
per-token mean of the global minibatch, whatever the split between processes.
"""

from __future__ import annotations

import contextlib

import torch

import apa_fast

from .config import TrainConfig
from .models import position_ids
from .rollout import IGNORE, Rollout, all_reduce_sum


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss; raised before the backward pass so that no weight is touched by it."""


# Each algorithm's loss op on the logits and from hidden states (`fused_lm_head`).
LOSS_OPS = {"apa": (apa_fast.loss, apa_fast.linear_loss), "ppo": (apa_fast.ppo_loss, apa_fast.linear_ppo_loss),
            "awr": (apa_fast.awr_loss, apa_fast.linear_awr_loss)}


def policy_loss(cfg: TrainConfig, model, hidden: torch.Tensor, batch: Rollout,
                normalizer: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, entropy)`` of the configured policy loss; ``hidden`` ``(B, R, H)`` scores the response.

    ``loss``: the sum over response tokens of the algorithm's loss minus ``cfg.entropy_coef`` times the token
    entropy, divided by ``normalizer`` when given (inside the op, so that its backward gets an upstream gradient
    of 1 and hands over the gradient the forward wrote, with no rescale pass); ``entropy``: float32 ``(B, R)``,
    the policy's entropy at the sampling temperature on each response token (0 elsewhere), detached, from the
    same pass over the vocabulary as the loss (no second forward).
    With ``cfg.fused_lm_head`` the lm_head projection is fused into the loss (`apa_fast.linear_loss` and its
    twins): the ``(B, R, V)`` logits and their gradient never exist. Under ZeRO-3 the caller holds the lm_head
    gathered (`lm_head_gathered`) over this call and the backward.
    """
    if cfg.algo == "apa":
        data, hyper = (batch.ref_logprobs, batch.advantages), dict(lam=cfg.apa_lam)
    elif cfg.algo == "ppo":
        data, hyper = (batch.logprobs, batch.advantages), dict(clip_eps=cfg.ppo_clip_eps)
    else:
        data, hyper = (batch.advantages,), dict(lam=cfg.awr_lam, max_weight=cfg.awr_max_weight)
    common = dict(temperature=cfg.logprob_temperature, ignore_index=IGNORE,
                  reduction="sum" if normalizer is None else "mean", normalizer=normalizer, backend=cfg.loss_backend,
                  entropy_coef=cfg.entropy_coef, return_entropy=True, **hyper)
    logits_op, linear_op = LOSS_OPS[cfg.algo]
    lm_head = model.lm_head
    if cfg.fused_lm_head:
        return linear_op(hidden, lm_head.weight, batch.labels, *data, bias=lm_head.bias, **common)
    return logits_op(lm_head(hidden), batch.labels, *data, **common)


def lm_head_gathered(cfg: TrainConfig, model):
    """The context the policy loss and its backward run in: the lm_head gathered under ZeRO-3 when fused."""
    if not cfg.fused_lm_head:
        return contextlib.nullcontext()
    return apa_fast.zero3.gathered(model.lm_head.weight, model.lm_head.bias, model=model)


def value_loss(values: torch.Tensor | None, batch: Rollout) -> torch.Tensor:
    """Sum over response tokens of ``0.5 * (V - returns)^2`` (unclipped, as the APA authors ran it); 0 without a
    critic (``values`` None)."""
    if values is None:
        return torch.zeros((), device=batch.returns.device)
    return 0.5 * ((values - batch.returns).square() * batch.response_mask).sum()


def set_lr(engine, cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps`` train steps, then constant; the step is the schedule's state."""
    lr = cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_on_rollout(engine, rollout: Rollout, cfg: TrainConfig, step: int, world_size: int) -> dict:
    """Run the update of ``step``; returns the global mean policy loss per minibatch (and the value loss's with a
    critic), and ``entropy``: the policy's mean entropy per response token over every pass of the update (all
    processes)."""
    model = engine.module
    model.train()
    rows = rollout.input_ids.shape[0]
    local_minibatch = cfg.minibatch_size // world_size
    prompt_len = rollout.prompt_len
    totals = torch.zeros(3, dtype=torch.float64)  # policy loss, value loss, this process's entropy sum
    tokens_total = 0.0  # response tokens of every pass, all processes: the entropy's weight
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, local_minibatch):
            batch = rollout.rows(order[start : start + local_minibatch].to(rollout.input_ids.device))
            tokens = all_reduce_sum(batch.response_mask.sum().double().cpu()).item()
            # Each process's share of the mean over the minibatch's tokens of every process.
            normalizer = max(tokens, 1.0) / world_size
            tokens_total += tokens
            hidden, values = engine(batch.input_ids, batch.attention_mask, position_ids(batch.attention_mask))
            response = slice(prompt_len - 1, -1)
            with lm_head_gathered(cfg, model):
                pg_loss, entropy = policy_loss(cfg, model, hidden[:, response], batch, normalizer)
                vf_loss = value_loss(None if values is None else values[:, response], batch) / normalizer
                loss = pg_loss + cfg.vf_coef * vf_loss
                finite = all_reduce_sum(torch.isfinite(loss.detach()).float().cpu()).item() == world_size
                if not finite:
                    raise NonFiniteLossError(
                        f"step {step}: the loss is not finite (policy {pg_loss.item()}, value {vf_loss.item()}); "
                        "stopped before applying it, the last checkpoint is the last good state"
                    )
                engine.backward(loss)
            engine.step()
            totals += torch.tensor([pg_loss.item() / world_size, vf_loss.item() / world_size,
                                    entropy.sum(dtype=torch.float64).item()], dtype=torch.float64)
    totals = all_reduce_sum(totals)
    minibatches = cfg.ppo_epochs * -(-rows // local_minibatch)
    losses = {"loss": totals[0].item() / minibatches, "entropy": totals[2].item() / max(tokens_total, 1.0)}
    return {**losses, "value_loss": totals[1].item() / minibatches} if cfg.has_critic else losses

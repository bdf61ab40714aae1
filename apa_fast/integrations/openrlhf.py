"""APA in OpenRLHF: `APAPolicyLoss` (OpenRLHF's `PolicyLoss` call plus ``ref_log_probs``) and the actor hook.

Read against OpenRLHF 0.11.2 (``openrlhf/models/loss.py``, ``openrlhf/trainer/ray/ppo_actor.py``):

- ``PolicyLoss.forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
  dp_size=1, batch_num_tokens=None, global_batch_size=None)`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl,
  is_filter_ratio)``; every tensor is ``(B, T)`` over the response tokens, advantages per token.
- ``ActorPPOTrainer.training_step(experience, kl_ctl, step, loss_batch_info=None)`` calls the loss without the
  reference log-probs. ``experience.base_action_log_probs`` holds them only when the reference model is loaded
  (``--algo.kl.init_coef > 0``) and the KL is a loss (``--algo.kl.use_loss``); the step then adds
  ``kl_ctl * KL`` to the loss.

`apa_actor_trainer` subclasses ``ActorPPOTrainer``: its loss is `APAPolicyLoss`, each step hands the
experience's reference log-probs to it and passes ``kl_ctl=0`` (APA's squared error is its anchor to pi_init;
OpenRLHF still computes and logs the KL). `install` puts that subclass in place inside an OpenRLHF worker
process; docs/integrations.md shows how to run it there. This module imports no OpenRLHF code itself.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

import apa_fast
from apa_fast.kinds import HYPER_RANGES
from apa_fast.validation import check_number, per_token_floats


class APAPolicyLoss(nn.Module):
    """APA's loss with OpenRLHF's `PolicyLoss` call signature (OpenRLHF 0.11.2).

    ``forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
    batch_num_tokens=None, global_batch_size=None, *, ref_log_probs=None)``: float ``(B, T)`` log-probs of the
    policy (differentiable), of the sampling policy and of pi_init; ``(B, T)`` advantages; ``(B, T)`` bool or 0/1
    ``action_mask``. Per token ``(log_probs - ref_log_probs - advantages / lam) ** 2``, aggregated as OpenRLHF's
    ``aggregate_loss`` does: token level, ``sum / batch_num_tokens * dp_size`` (the masked mean without
    ``batch_num_tokens``); sample level (``token_level_loss=False``), the mean of per-sequence token means
    over ``global_batch_size`` sequences, times ``dp_size``.

    Returns ``(loss, clip_ratio, ppo_kl, None, None)`` like `PolicyLoss` with its rollout correction off:
    ``clip_ratio`` is 0 (APA clips nothing), ``ppo_kl`` the masked mean of ``old_log_probs - log_probs``.
    ``rollout_log_probs`` is accepted and unused (no train/rollout importance correction). Without
    ``ref_log_probs=``, the ones given by the `reference` context (the actor hook) are used.
    """

    def __init__(self, lam: float = 1.0, token_level_loss: bool = True):
        super().__init__()
        self.lam = float(check_number("lam", lam, HYPER_RANGES["lam"]))  # apa_fast.loss's range, checked here
        self.token_level_loss = token_level_loss
        self._reference = None

    @contextlib.contextmanager
    def reference(self, ref_log_probs: torch.Tensor | None):
        """Within the block, calls without ``ref_log_probs=`` use these (the hook's way past OpenRLHF's call)."""
        if ref_log_probs is None:
            raise ValueError(
                "OpenRLHF passed no reference log-probs (experience.base_action_log_probs is None): run with "
                "--algo.kl.init_coef > 0 (loads the reference model) and --algo.kl.use_loss (keeps its log-probs in "
                "the experience; the APA hook sets the KL loss's coefficient to 0)")
        self._reference = ref_log_probs
        try:
            yield self
        finally:
            self._reference = None

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None, *, ref_log_probs=None):
        if ref_log_probs is None:
            ref_log_probs = self._reference
        if ref_log_probs is None:
            raise ValueError("APAPolicyLoss needs ref_log_probs= (log pi_init of the actions), or a call inside "
                             "`with loss.reference(ref_log_probs):` as the actor hook does")
        if not isinstance(log_probs, torch.Tensor):
            raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
        # Checked under OpenRLHF's names before any arithmetic (the rest by apa_loss_from_logprobs).
        old_log_probs, ref_log_probs = (
            per_token_floats(name, tensor, log_probs.shape, log_probs.device, "log_probs").view(log_probs.shape)
            for name, tensor in (("old_log_probs", old_log_probs), ("ref_log_probs", ref_log_probs)))
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        if self.token_level_loss:
            normalizer = None if batch_num_tokens is None else batch_num_tokens / dp_size
            loss = apa_fast.apa_loss_from_logprobs(log_probs, ref_log_probs, advantages, action_mask, lam=self.lam,
                                                   normalizer=normalizer)
        else:
            per_token = apa_fast.apa_loss_from_logprobs(log_probs, ref_log_probs, advantages, action_mask,
                                                        lam=self.lam, reduction="none")
            counts = action_mask.sum(-1).to(per_token.dtype)
            per_sequence = per_token.sum(-1) / counts.clamp(min=1.0)
            sequences = (counts > 0).sum().clamp(min=1) if global_batch_size is None else global_batch_size / dp_size
            loss = per_sequence.sum() / sequences
        counted = action_mask.to(log_probs.dtype)
        ppo_kl = ((old_log_probs - log_probs.detach()) * counted).sum() / counted.sum().clamp(min=1.0)
        return loss, torch.zeros_like(ppo_kl), ppo_kl, None, None


def apa_actor_trainer(trainer_cls: type, lam: float = 1.0) -> type:
    """A subclass of OpenRLHF's ``ActorPPOTrainer`` (``trainer_cls``) that trains with `APAPolicyLoss`.

    Its loss keeps the token/sample aggregation OpenRLHF configured (``--actor.loss_agg_mode``); each
    ``training_step`` passes ``experience.base_action_log_probs`` to the loss and ``kl_ctl=0`` to OpenRLHF's step.
    ``lam`` is checked here, before OpenRLHF builds the trainer.
    """
    lam = check_number("lam", lam, HYPER_RANGES["lam"])

    class APAActorPPOTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.actor_loss_fn = APAPolicyLoss(lam, token_level_loss=self.actor_loss_fn.token_level_loss)

        def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
            with self.actor_loss_fn.reference(experience.base_action_log_probs):
                return super().training_step(experience, 0.0, step, loss_batch_info)

    APAActorPPOTrainer.__qualname__ = f"APA{trainer_cls.__qualname__}"
    return APAActorPPOTrainer


def install(lam: float | None = None) -> None:
    """In an OpenRLHF actor process, once: make ``PolicyModelActor`` build the APA trainer (imports OpenRLHF).

    ``lam=None`` reads the environment variable ``APA_FAST_LAM`` (default 1.0): Ray calls a
    ``worker_process_setup_hook`` without arguments, and passes environment variables to its workers.
    """
    if lam is None:
        text = os.environ.get("APA_FAST_LAM", "1.0")
        try:
            lam = float(text)
        except ValueError:
            raise ValueError(f"APA_FAST_LAM must be a number, got {text!r}") from None
    lam = check_number("lam", lam, HYPER_RANGES["lam"])  # before OpenRLHF is imported: a bad value says so first
    from openrlhf.trainer.ray import ppo_actor

    ppo_actor.ActorPPOTrainer = apa_actor_trainer(ppo_actor.ActorPPOTrainer, lam)

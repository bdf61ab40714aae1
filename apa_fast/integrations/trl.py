"""APA in TRL: `APAGRPOTrainer` is `trl.GRPOTrainer` with its policy loss replaced by APA's.

Switching is one class name (read against TRL 1.16's ``trl/trainer/grpo_trainer.py``)::

    from apa_fast.integrations.trl import APAGRPOTrainer
    trainer = APAGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                             apa_lam=1.0, apa_mode="logits")

Everything else is TRL's: generation, rewards, group-relative advantages ``A`` (one per completion), logging,
checkpoints. Per micro-batch the loss is

    sum over completion tokens of (logp - ref_logp - A / apa_lam) ** 2  /  N

with ``logp`` the policy's log-probability of each completion token at TRL's sampling ``temperature``,
``ref_logp`` the same under pi_init, and ``N`` the completion tokens of one optimizer step's global batch
divided by the number of ranks (TRL's token-level normalisation, that of ``loss_type="dapo"``): gradient
accumulation and data-parallel ranks add up to the token mean over the global batch.

- ``beta``: APA's squared error is its own anchor to pi_init, so TRL's KL penalty is not added. With
  ``beta == 0`` (TRL's default) TRL loads no reference model; this trainer then keeps a frozen copy of the
  policy as built (or disables the PEFT adapter, as TRL does) and scores the completions with it. With
  ``beta != 0`` TRL's own reference log-probs are used.
- ``apa_mode="logits"``: the model's forward returns the completion logits, `apa_fast.logprobs` reads them in
  place. ``"linear"``: the forward returns the final hidden states and `apa_fast.linear_logprobs` projects them
  through the lm_head in chunks, so the ``(B, C, V)`` logits never exist. The logit multipliers and soft-capping
  are those TRL's fused head applies (`logit_transform`). Either way the same fused pass returns the per-token
  entropy at TRL's temperature.
- TRL's options beside the per-token loss keep TRL's meaning: the entropy bonus (``entropy_coef``, static or
  ``use_adaptive_entropy``: ``loss - coef * mean entropy``), the entropy filter (``top_entropy_quantile``) and the
  off-policy sequence mask (``off_policy_mask_threshold``) select APA's counted tokens as they select GRPO's, and
  a MoE model's router aux loss is added on top, as TRL adds it.
- Guard: during the first optimizer step the policy still is pi_init, so ``logp - ref_logp`` must be ~0;
  a larger mean (logits misaligned with the labels, another temperature, another head scaling) raises.
- Metrics: ``apa/logp_minus_ref`` and ``apa/residual`` (token means of ``logp - ref_logp`` and of
  ``logp - ref_logp - A / apa_lam``), and TRL's ``entropy`` (``policy_loss``, ``entropy_coef`` with the entropy
  bonus; ``aux_loss`` for MoE models).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import torch
from torch import nn

try:
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
    from trl.models import prepare_deepspeed
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import add_fused_lm_head, use_adapter
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "apa_fast.integrations.trl needs TRL (tested with trl 1.16): pip install 'apa_fast[trl]'") from exc

import apa_fast
from apa_fast.kinds import HYPER_RANGES
from apa_fast.validation import check_choice, check_number

logger = logging.getLogger(__name__)

MODES = ("logits", "linear")

# Mean |logp - ref_logp| (nats per token) above which the first-step check raises. The policy and the
# reference run the same weights through two code paths (this forward vs TRL's chunked head), which agreed
# exactly in tests/test_integrations_trl.py (float32 and bf16 autocast, both modes); there, a temperature of 1.0
# instead of 0.7 gave 0.44, and an off-by-one between logits and labels moves a trained model by nats.
FIRST_STEP_TOLERANCE = 0.1

# GRPO options that would change what APA's per-token loss means (docs/integrations.md says why).
_UNSUPPORTED = {
    "vllm_importance_sampling_correction": lambda t: t.use_vllm and t.vllm_importance_sampling_correction,
}
# Inputs of vision-language models, whose forward this trainer does not build.
_MULTIMODAL_KEYS = ("pixel_values", "token_type_ids", "mm_token_type_ids")


class APAGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` trained with APA's loss (see the module docstring).

    Extra keyword arguments:
        apa_lam: APA's ``lam``, in `apa_fast.loss`'s range [1e-6, 1e6]: the residual is
            ``logp - ref_logp - A / apa_lam``.
        apa_mode: ``"logits"`` (the model returns the completion logits) or ``"linear"`` (hidden states
            through `apa_fast.linear_logprobs`; the logits are never materialised).
    """

    def __init__(self, *args, apa_lam: float = 1.0, apa_mode: str = "logits", **kwargs):
        # Checked before TRL builds anything, as the ops would check them at the first step.
        apa_lam = check_number("apa_lam", apa_lam, HYPER_RANGES["lam"])
        check_choice("apa_mode", apa_mode, MODES)
        super().__init__(*args, **kwargs)
        self.apa_lam = float(apa_lam)
        self.apa_mode = apa_mode
        unsupported = [name for name, is_set in _UNSUPPORTED.items() if is_set(self)]
        if unsupported:
            raise ValueError(f"APAGRPOTrainer: these options would change what APA's per-token loss means and are "
                             f"not supported (docs/integrations.md says why): {', '.join(unsupported)}")
        if apa_mode == "linear" and self._apa_sharded():
            raise ValueError("apa_mode='linear' reads the lm_head weight outside its module, which DeepSpeed ZeRO-3 "
                             "and FSDP shard; use apa_mode='logits'")
        if self.beta != 0.0:
            logger.warning("APAGRPOTrainer: beta=%s only makes TRL score the reference model; its KL penalty is not "
                           "added (APA's squared error anchors the policy to pi_init, with strength apa_lam)",
                           self.beta)
        if self.loss_type != "dapo":
            logger.warning("APAGRPOTrainer: loss_type=%r is not used; APA normalises by the completion tokens of "
                           "the accumulated batch (like loss_type='dapo')", self.loss_type)
        self._apa_reference = self._apa_make_reference() if self.beta == 0.0 else None
        self._apa_check_first_step = not _dropout_active(self.accelerator.unwrap_model(self.model))
        if not self._apa_check_first_step:
            logger.warning("APAGRPOTrainer: dropout is active, so the first-step check of logp == ref_logp is off "
                           "(set disable_dropout=True to keep it)")

    def _apa_sharded(self) -> bool:
        """True when parameters are sharded across ranks (FSDP or DeepSpeed ZeRO-3)."""
        return self.is_fsdp_enabled or (self.is_deepspeed_enabled
                                        and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    # ---- the reference log-probs --------------------------------------------------------------------------

    def _apa_make_reference(self):
        """pi_init when TRL loads none (beta == 0): a frozen copy of the policy, or None for a PEFT policy."""
        if is_peft_model(self.model):
            return None  # scored with the adapter disabled, as TRL does
        if self._apa_sharded():
            raise ValueError("APAGRPOTrainer with beta == 0 copies the policy as its reference, which cannot be done "
                             "on FSDP or ZeRO-3 shards: set beta to any non-zero value (TRL then loads the reference "
                             "from the model's path; APA does not use beta as a coefficient) or train a PEFT adapter")
        reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        # TRL's patches of the policy close over the policy: its fused-head forward calls the policy's original
        # forward, and the float32 lm_head forward of cast_lm_head_to_fp32 projects with the policy's weight. A deep
        # copy keeps those closures, so both are put back on the copy's own modules.
        reference.__dict__.pop("forward", None)
        if self.args.cast_lm_head_to_fp32:
            head = reference.get_output_embeddings()
            head.forward = functools.partial(_float32_linear, head)
        add_fused_lm_head(reference, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if "ref_per_token_logps" not in batch:  # beta == 0: TRL scored no reference
            batch["ref_per_token_logps"] = self._apa_reference_logprobs(batch)
        return batch

    @torch.no_grad()
    def _apa_reference_logprobs(self, batch) -> torch.Tensor:
        """(B, C) float32 log pi_init of the completion tokens, through TRL's own scoring path."""
        _check_text_only(batch)
        input_ids, attention_mask = _sequences(batch)
        if self._apa_reference is not None:
            model, reference_context = self._apa_reference, contextlib.nullcontext()
        else:
            peft_model = self.accelerator.unwrap_model(self.model)
            model = self.model
            reference_context = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        batch_size = (self.args.per_device_train_batch_size if self.model.training
                      else self.args.per_device_eval_batch_size)
        with reference_context, disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, batch["completion_ids"].size(1), batch_size=batch_size)
        return logps

    # ---- the loss -----------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """APA's loss of one micro-batch, with TRL's masks, entropy bonus and router aux loss around it.

        Follows ``GRPOTrainer._compute_loss`` (TRL 1.16) step for step, with APA's squared residual as the
        per-token loss: the off-policy and entropy masks zero tokens of the sum without changing its normaliser,
        the entropy bonus is ``coef`` times the token-mean entropy of the micro-batch (over the entropy mask) per
        accumulation step, and the aux loss is added per accumulation step.
        """
        _check_text_only(inputs)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        labels = inputs["completion_ids"].masked_fill(mask == 0, -100)
        logp, entropy, aux_loss = self._apa_policy_forward(model, inputs, labels)
        mode = "train" if self.model.training else "eval"
        ref_logp, advantages = inputs["ref_per_token_logps"], inputs["advantages"]

        counted = mask
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropy.detach(), mask, 1 - self.top_entropy_quantile)
            counted = counted * entropy_mask
        if self.off_policy_mask_threshold is not None:
            # TRL's sequence mask: drops a negative-advantage completion whose mean log-ratio to the sampler's
            # log-probs (vLLM's when present, else the old policy's, else this policy's: no drift) is over the
            # threshold.
            old_logp = inputs.get("old_per_token_logps")
            old_logp = logp.detach() if old_logp is None else old_logp
            counted = counted * self.get_off_policy_mask(
                advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages, per_token_logps=logp,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logp), mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold)

        # TRL's token-level normaliser: num_items_in_batch counts the completion tokens of the generation batch
        # over all ranks, which spans steps_per_generation micro-batches per rank.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = apa_fast.apa_loss_from_logprobs(logp, ref_logp, advantages, counted, lam=self.apa_lam,
                                               normalizer=normalizer)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self._entropy_bonus_enabled:
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(loss.detach()).nanmean().item())
            bonus_mask = mask if entropy_mask is None else mask * entropy_mask
            loss = loss - self._apa_entropy_coef(entropy.detach(), bonus_mask, mode) * (
                (entropy * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0) / accumulation)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._apa_log_and_check(logp.detach(), entropy.detach(), ref_logp, advantages, mask)
        return loss

    def _apa_entropy_coef(self, entropy, mask, mode) -> float:
        """The entropy bonus's coefficient for this micro-batch, and TRL's adaptive controller (TRL 1.16's rules).

        Adaptive: the coefficient of the previous optimizer step applies while the entropy measured then is at or
        under ``entropy_target`` (0 before the first measurement); at each optimizer step the window's
        token-mean entropy over all ranks moves the coefficient by ``entropy_coef_delta`` towards more entropy
        bonus when under the target, less otherwise, within ``[entropy_coef_min, entropy_coef_max]``.
        """
        coef = self.entropy_coef
        if self.use_adaptive_entropy:
            coef = coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            if mode == "train":
                stats = torch.stack([(entropy * mask).sum(), mask.sum()])
                self._entropy_window_stats = stats if self._entropy_window_stats is None else (
                    self._entropy_window_stats + stats)
                if self.accelerator.sync_gradients:
                    totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    self._last_world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                    step = self.args.entropy_coef_delta
                    if self._last_world_entropy <= self.args.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                    self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef

    def _apa_policy_forward(self, model, inputs, labels):
        """The policy's ``(B, C)`` float32 log-probs of ``labels`` (the completion, -100 where not counted) and
        entropies at TRL's temperature (0 where not counted), both differentiable and from one fused pass, and
        the router aux loss (a scalar tensor) when TRL adds one, else None."""
        input_ids, attention_mask = _sequences(inputs)
        completion_length = labels.size(1)
        router = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            if self.apa_mode == "logits":
                # Position i scores token i + 1: the last C + 1 positions score the C completion tokens and one
                # token past them, dropped.
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                logits_to_keep=completion_length + 1, **router)
                logp, entropy = apa_fast.logprobs(outputs.logits[:, :-1], labels, temperature=self.temperature,
                                                  return_entropy=True)
                return logp, entropy, outputs.get("aux_loss")
            # One logit position only: the forward's own head is skipped, the hidden states are projected below.
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                            output_hidden_states=True, **router)
            hidden = outputs.hidden_states[-1][:, -completion_length - 1:-1]
        weight, bias = self._apa_lm_head()
        scale, softcap = logit_transform(self.accelerator.unwrap_model(self.model).config)
        head_context = self.accelerator.autocast()
        if self.args.cast_lm_head_to_fp32:  # TRL then projects in float32 outside autocast, the reference too
            hidden = hidden.float()
            head_context = torch.autocast(hidden.device.type, enabled=False)
        with head_context:
            logp, entropy = apa_fast.linear_logprobs(hidden, weight, labels, bias=bias, logit_scale=scale,
                                                     logit_softcap=softcap, temperature=self.temperature,
                                                     return_entropy=True)
        return logp, entropy, outputs.get("aux_loss")

    def _apa_lm_head(self):
        """The lm_head's (V, H) weight and (V,) bias or None, through PEFT and distributed wrappers."""
        head = self.accelerator.unwrap_model(self.model).get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError("apa_mode='linear' needs a model whose get_output_embeddings() is a linear lm_head; "
                             f"got {type(head).__name__}: use apa_mode='logits'")
        if hasattr(head, "base_layer"):  # a PEFT tuner layer: its weight misses the adapter's delta
            raise ValueError("apa_mode='linear' cannot read an lm_head that carries a PEFT adapter (lm_head in "
                             "target_modules): use apa_mode='logits'")
        return head.weight, getattr(head, "bias", None)

    def _apa_log_and_check(self, logp, entropy, ref_logp, advantages, mask):
        """Logs the apa/ metrics and TRL's ``entropy`` (token means over all ranks and every completion token);
        before the first optimizer step, checks logp == ref."""
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        mask = mask.to(logp.dtype)
        logp_minus_ref = logp - ref_logp
        residual = logp_minus_ref - advantages / self.apa_lam
        totals = self.accelerator.reduce(torch.stack([
            (logp_minus_ref * mask).sum(), (residual * mask).sum(), (logp_minus_ref.abs() * mask).sum(),
            (entropy * mask).sum(), mask.sum()]), reduction="sum")
        count = totals[4].clamp(min=1.0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["apa/logp_minus_ref"].append((totals[0] / count).item())
        self._metrics[mode]["apa/residual"].append((totals[1] / count).item())
        self._metrics[mode]["entropy"].append((totals[3] / count).item())
        if self._apa_check_first_step and self.model.training and self.state.global_step == 0:
            mean_abs = (totals[2] / count).item()
            if not mean_abs <= FIRST_STEP_TOLERANCE:
                raise RuntimeError(
                    f"APAGRPOTrainer: before the first optimizer step the policy equals pi_init, yet the mean "
                    f"|logp - ref_logp| over the completion tokens is {mean_abs:.3g} nats (tolerance "
                    f"{FIRST_STEP_TOLERANCE}). The policy's log-probs and the reference's disagree: logits misaligned "
                    f"with the completion tokens, another temperature (TRL samples at {self.temperature}), another "
                    f"logit scaling, or a reference model that is not the policy's initial weights.")


def _sequences(batch):
    """(B, P + C) token ids and attention mask: the left-padded prompt then the right-padded completion."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask


def _check_text_only(batch):
    present = [key for key in _MULTIMODAL_KEYS if key in batch]
    if present:
        raise ValueError(f"APAGRPOTrainer supports text-only models; the batch carries {present}")


def logit_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, logit_softcap)`` after the lm_head, read from a model config as TRL 1.16's fused head reads it.

    The logits are ``softcap * tanh(scale * z / softcap)`` (no tanh when ``softcap`` is None), then ``/ T``;
    ``linear_logprobs(..., logit_scale=, logit_softcap=)`` applies them. The first multiplier set wins, in TRL's
    order (``trl.trainer.utils.add_fused_lm_head``): ``logit_scale`` (Cohere; None on MPT means unscaled),
    ``output_multiplier`` (Muse Glimmer / Spark), ``lm_head_multiplier`` (Falcon-H1), then ``logits_scaling``,
    which Granite and MiniCPM3 divide by and HyperCLOVA X multiplies by. ``final_logit_softcapping``: Gemma 2/3,
    Muse Glimmer.
    """
    text_config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None) if scale is None else scale
    logits_scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and logits_scaling is not None:
        scale = logits_scaling if text_config.model_type == "hyperclovax" else 1.0 / logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


def _float32_linear(head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """TRL's lm_head forward under ``cast_lm_head_to_fp32`` (float32 projection), with ``head``'s own weight."""
    bias = None if head.bias is None else head.bias.float()
    return nn.functional.linear(hidden_states.float(), head.weight.float(), bias)


def _dropout_active(model: nn.Module) -> bool:
    """True when a forward in training mode is random: dropout modules or config dropout rates above 0."""
    config = model.config.get_text_config().to_dict()
    rates = [value for key, value in config.items()
             if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(value, float)]
    return any(rate > 0 for rate in rates) or any(
        isinstance(module, nn.Dropout) and module.p > 0 for module in model.modules())

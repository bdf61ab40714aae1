"""APAGRPOTrainer inside the real TRL (the version pinned in constraints.txt), on a tiny random Llama.

Each run: 2 prompts x 4 generations per optimizer step, gradient accumulation 2, temperature 0.7, 8 completion
tokens, 2 optimizer steps. The first step's loss is recomputed in float64 from the very tensors the adapter
passed to apa_fast (recorded by wrapping apa_fast's functions), including the normaliser, which must be the
completion-token count of the whole accumulated batch.
"""

import copy
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import assert_close_rel
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig
from trl.trainer.utils import add_fused_lm_head

import apa_fast
from apa_fast.integrations.trl import APAGRPOTrainer, logit_transform
from apa_fast.train.models import train_tokenizer

PROMPTS = [f"question {i}: what is {i} plus {i + 1}? answer briefly." for i in range(32)]
LAM = 0.5
TEMPERATURE = 0.7
# Relative error of the first-step loss against float64 on the same tensors. float32: the loss is float32
# arithmetic over ~64 tokens (~1e-6). bf16 autocast: logits mode reads the bf16 logits the model produced, so it
# is float32-accurate too; linear mode projects in bf16 inside the kernel where the oracle projects in float64,
# so each logit carries bf16 rounding (2^-9 relative) and the loss ~1e-2.
LOSS_TOL = {("logits", False): 1e-5, ("linear", False): 1e-5, ("logits", True): 1e-5, ("linear", True): 3e-2}
# Largest |logp_logits - logp_linear| (nats) on the same first batch, and the relative difference of the two
# first-step losses: float32 agrees to rounding; under bf16 one mode rounds the logits of a bf16 matmul, the other
# rounds inside its chunked matmul (logits of size ~3).
MODES_TOL = {False: 1e-5, True: 5e-2}
# Relative error of the loss's gradient with respect to the head's input (logits or hidden states) against float64:
# float32 rounding; bf16 gradients carry bf16 rounding (2^-9), and linear mode's bf16 projection more.
GRAD_TOL = {("logits", False): 1e-4, ("linear", False): 1e-4, ("logits", True): 1e-2, ("linear", True): 5e-2}


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(PROMPTS, 300)
    tok.padding_side = "left"
    return tok


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # A head that spreads the logits (std ~2 instead of ~0.2), so that log-probs depend on the temperature.
    torch.nn.init.normal_(model.lm_head.weight, std=0.25)
    return model


# Tiny random models of each logit multiplier TRL 1.16's fused head applies, and the MoE models of TRL's own GRPO
# tests with their default config (router_aux_loss_coef 0.001, output_router_logits off): (config class, model
# class, settings, the (logit_scale, logit_softcap) TRL applies).
FALCON_H1_SSM = dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16)
KINDS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, (1.0, None)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.7), (0.7, None)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=64, n_heads=4, n_layers=2), (1.0, None)),  # logit_scale None
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=3.0), (1 / 3.0, None)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", dict(logits_scaling=3.0), (3.0, None)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(lm_head_multiplier=8.0, **FALCON_H1_SSM), (8.0, None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0, head_dim=16), (1.0, 2.0)),
    "muse_glimmer": ("MuseGlimmerConfig", "MuseGlimmerForConditionalGeneration", dict(
        text_config=dict(head_dim=16, final_logit_softcapping=5.0, output_multiplier=0.5),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           layer_types=["full_attention"]), projector_hidden_size=32, out_hidden_size=64), (0.5, 5.0)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                   moe_intermediate_size=32), (1.0, None)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), (1.0, None)),
}


def tiny_model(kind, tokenizer, seed=0):
    config_name, model_name, settings, _ = KINDS[kind]
    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if "text_config" in settings:  # a vision-language model: the sizes are its language model's
        settings = {**settings, "text_config": {**sizes, **settings["text_config"]}}
        sizes = {}
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**sizes, **settings))
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=0.25)  # logits that depend on the temperature
    return model


def reward_length(completions, **_):
    return [len(c) / 10.0 for c in completions]


def grpo_args(tmp_path, *, bf16=False, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                    gradient_accumulation_steps=2, max_completion_length=8, max_steps=2, learning_rate=1e-3,
                    temperature=TEMPERATURE, use_cpu=True, bf16=bf16, report_to="none", save_strategy="no",
                    logging_steps=1, seed=0, disable_dropout=True)
    settings.update(overrides)
    return GRPOConfig(**settings)


class Recorder:
    """Records each training micro-batch: TRL's inputs, the arguments and results of the apa_fast calls the adapter
    makes, the loss it returns and that loss's gradient with respect to the head's input (logits or hidden)."""

    def __init__(self, monkeypatch):
        self.batches = []
        for name in ("logprobs", "linear_logprobs", "apa_loss_from_logprobs"):
            monkeypatch.setattr(apa_fast, name, self._wrap(name, getattr(apa_fast, name)))
        monkeypatch.setattr(APAGRPOTrainer, "_compute_loss", self._wrap_loss(APAGRPOTrainer._compute_loss))

    def _wrap(self, name, fn):
        fn = getattr(fn, "__wrapped__", fn)  # a second run in the same test wraps the original again

        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            # Copies: the optimizer updates the lm_head weight in place after this call.
            copies = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            self._batch["head" if name != "apa_loss_from_logprobs" else "apa"] = (name, copies, kwargs, out)
            self._batch.setdefault("head_input", args[0])
            return out
        recorded.__wrapped__ = fn
        return recorded

    def _wrap_loss(self, compute_loss):
        compute_loss = getattr(compute_loss, "__wrapped__", compute_loss)

        def recorded(trainer, model, inputs):
            self._batch = {"inputs": {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}}
            if trainer.aux_loss_enabled:  # TRL's own aux loss of these inputs, through its fused head
                with torch.no_grad():
                    self._batch["trl_aux"] = trl_fused_outputs(trainer, model, inputs, compute_aux_loss=True)[2]
            loss = compute_loss(trainer, model, inputs)
            self._batch["loss"] = loss.detach().clone()
            self._batch["grad"] = torch.autograd.grad(loss, self._batch.pop("head_input"), retain_graph=True)[0]
            self.batches.append(self._batch)
            return loss
        recorded.__wrapped__ = compute_loss
        return recorded


def trl_fused_outputs(trainer, model, inputs, compute_aux_loss=False):
    """TRL's own (logps, entropies, aux_loss) of ``model`` on the completions of ``inputs``, through its fused head."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                      inputs["completion_ids"].size(1), compute_entropy=True,
                                                      compute_aux_loss=compute_aux_loss)


def float64_head(head_call, head_input):
    """float64 (log-probs, entropies) of the recorded head call, 0 where not counted, from ``head_input``."""
    name, args, kwargs, _ = head_call
    if name == "logprobs":
        labels = args[1]
        z = head_input
    else:
        _, weight, labels = args
        bias = kwargs.get("bias")
        z = head_input @ weight.double().T
        if bias is not None:
            z = z + bias.double()
        z = z * kwargs.get("logit_scale", 1.0)
        if kwargs.get("logit_softcap") is not None:
            z = kwargs["logit_softcap"] * torch.tanh(z / kwargs["logit_softcap"])
    logq = torch.log_softmax(z / kwargs["temperature"], dim=-1)
    counted = labels != -100
    logp = logq.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logp.masked_fill(~counted, 0.0), entropy.masked_fill(~counted, 0.0)


def check_against_float64(trainer, batches, accumulation=2, loss_tol=1e-5, grad_tol=1e-4):
    """Recomputes each micro-batch's loss and its gradient in float64 with TRL 1.16's semantics, written out here:
    APA's squared residual over the counted tokens (TRL's entropy and off-policy masks), over the window's
    completion tokens; minus the entropy bonus (coef * token-mean entropy / accumulation, the coefficient from
    TRL's adaptive rule when on); plus the router aux loss / accumulation. Returns the relative loss errors."""
    args = trainer.args
    coef, last_world_entropy, window = args.entropy_coef, float("inf"), [0.0, 0.0]
    errors = []
    for i, batch in enumerate(batches):
        inputs, head, apa = batch["inputs"], batch["head"], batch["apa"]
        mask = inputs["completion_mask"].bool()
        logp32, entropy32 = head[3]
        # The normaliser spans the accumulated batch: every micro-batch of this optimizer step.
        first = i - i % accumulation
        window_tokens = sum(b["inputs"]["completion_mask"].sum().item() for b in batches[first:first + accumulation])
        assert torch.as_tensor(apa[2]["normalizer"]).item() == pytest.approx(window_tokens)

        counted = mask.clone()
        entropy_mask = torch.ones_like(mask)
        if args.top_entropy_quantile < 1.0:
            threshold = torch.quantile(entropy32[mask], 1 - args.top_entropy_quantile)
            entropy_mask = (entropy32 >= threshold) & mask
            counted &= entropy_mask
        if args.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps", logp32.detach())
            drift = ((old - logp32.detach()) * mask).sum(1) / mask.sum(1).clamp(min=1)
            keep = (inputs["advantages"] >= 0) | (drift <= args.off_policy_mask_threshold)
            batch["off_policy_dropped"] = (~keep).sum().item()
            counted &= keep[:, None]
        assert torch.equal(apa[1][3].bool(), counted), "the tokens APA counts"

        head_input = head[1][0].double().requires_grad_()
        logp, entropy = float64_head(head, head_input)
        residual = logp - inputs["ref_per_token_logps"].double() - inputs["advantages"].double()[:, None] / LAM
        expected = (residual.square() * counted).sum() / window_tokens
        if trainer._entropy_bonus_enabled:
            bonus_mask = (mask & entropy_mask).double()
            applied = coef if not args.use_adaptive_entropy or last_world_entropy <= args.entropy_target else 0.0
            expected = expected - applied * (entropy * bonus_mask).sum() / bonus_mask.sum() / accumulation
            window[0] += (entropy * bonus_mask).sum().item()
            window[1] += bonus_mask.sum().item()
        if trainer.aux_loss_enabled:
            expected = expected + trainer.router_aux_loss_coef * batch["trl_aux"].double() / accumulation
        errors.append(abs(batch["loss"].item() - expected.item()) / abs(expected.item()))
        assert errors[-1] <= loss_tol, f"micro-batch {i}: loss {batch['loss'].item()} vs float64 {expected.item()}"
        (grad,) = torch.autograd.grad(expected, head_input)
        assert_close_rel(batch["grad"], grad, grad_tol, f"micro-batch {i}: gradient of the loss")
        if args.use_adaptive_entropy and i % accumulation == accumulation - 1:  # TRL's rule, at each optimizer step
            last_world_entropy = window[0] / window[1]
            step = args.entropy_coef_delta
            coef = (min(coef + step, args.entropy_coef_max) if last_world_entropy <= args.entropy_target
                    else max(coef - step, args.entropy_coef_min))
            window = [0.0, 0.0]
    if args.use_adaptive_entropy:
        assert trainer._last_world_entropy == pytest.approx(last_world_entropy, rel=1e-5)
        assert trainer.entropy_coef == pytest.approx(coef)
    return errors


def train(tmp_path, tokenizer, monkeypatch, *, mode, bf16=False, model=None, **overrides):
    recorder = Recorder(monkeypatch)
    policy = tiny_llama(tokenizer) if model is None else model
    trainer = APAGRPOTrainer(model=policy, reward_funcs=reward_length, args=grpo_args(tmp_path, bf16=bf16, **overrides),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                             apa_lam=LAM, apa_mode=mode)
    trainable = trainer.accelerator.unwrap_model(trainer.model)
    before = {name: p.detach().clone() for name, p in trainable.named_parameters() if p.requires_grad}
    trainer.train()
    unchanged = [name for name, p in trainable.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    return trainer, recorder.batches, unchanged


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trl_apa_both_modes(tmp_path, tokenizer, monkeypatch, bf16):
    first = {}
    for mode in ("logits", "linear"):
        trainer, batches, unchanged = train(tmp_path / mode, tokenizer, monkeypatch, mode=mode, bf16=bf16)
        assert len(batches) == 4  # 2 optimizer steps x 2 micro-batches
        head_call = batches[0]["head"]
        assert head_call[2]["temperature"] == TEMPERATURE
        if bf16 and mode == "logits":  # the lm_head ran under autocast: bf16 values (accelerate may upcast them)
            logits = head_call[1][0]
            assert torch.equal(logits.to(torch.bfloat16).to(logits.dtype), logits)
        errors = check_against_float64(trainer, batches, loss_tol=LOSS_TOL[mode, bf16], grad_tol=GRAD_TOL[mode, bf16])
        # At the first step logp == ref_logp (the policy is pi_init); the second step's batch, sampled after an
        # update, has logp != ref_logp and so checks the log-probs themselves.
        print(f"{mode} {'bf16' if bf16 else 'fp32'}: loss vs float64, first step {errors[0]:.2e}, "
              f"worst micro-batch {max(errors):.2e}")
        assert not unchanged, f"parameters without gradient: {unchanged}"
        logged = [h for h in trainer.state.log_history if "apa/residual" in h]
        assert len(logged) == 2 and all("apa/logp_minus_ref" in h and "entropy" in h for h in logged)
        first[mode] = batches[0]
    # Same seed, same weights: both modes score the same first completions, to rounding, and give the same loss.
    linear, logits = first["linear"], first["logits"]
    torch.testing.assert_close(linear["head"][1][2], logits["head"][1][1])
    for linear_out, logits_out in zip(linear["head"][3], logits["head"][3], strict=True):  # logp, entropy
        torch.testing.assert_close(linear_out, logits_out, rtol=0, atol=MODES_TOL[bf16])
    assert linear["loss"].item() == pytest.approx(logits["loss"].item(), rel=MODES_TOL[bf16])


def test_trl_reference_from_trl_when_beta_is_set(tmp_path, tokenizer, monkeypatch):
    """beta != 0: TRL loads the reference from the model's path; its log-probs feed APA unchanged."""
    tiny_llama(tokenizer).save_pretrained(tmp_path / "policy")
    trainer, batches, unchanged = train(tmp_path / "run", tokenizer, monkeypatch, mode="logits",
                                        model=str(tmp_path / "policy"), beta=0.04)
    assert trainer._apa_reference is None and trainer.ref_model is not None
    check_against_float64(trainer, batches)
    assert not unchanged


def test_trl_peft_reference_is_the_disabled_adapter(tmp_path, tokenizer, monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer, batches, unchanged = train(tmp_path, tokenizer, monkeypatch, mode="linear", model=model)
    assert trainer._apa_reference is None  # no copy: the first-step check passed against the disabled adapter
    assert not unchanged
    check_against_float64(trainer, batches)


def test_trl_reference_is_its_own_model(tmp_path, tokenizer):
    """beta == 0: the reference copy runs its own forward and lm_head, even after the policy's weights change
    (TRL's patched forward and its float32 lm_head forward close over the policy)."""
    policy = tiny_llama(tokenizer)
    pristine = copy.deepcopy(policy).eval()
    trainer = APAGRPOTrainer(model=policy, reward_funcs=reward_length, processing_class=tokenizer,
                             args=grpo_args(tmp_path, cast_lm_head_to_fp32=True),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
    reference = trainer._apa_reference
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    input_ids = torch.randint(0, len(tokenizer), (2, 10))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.masked_fill(torch.arange(10) < 6, -100)
    with torch.no_grad():
        expected = pristine(input_ids=input_ids, attention_mask=attention_mask)
        assert not torch.allclose(policy(input_ids=input_ids).logits, expected.logits)  # the policy did change
        torch.testing.assert_close(reference(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   expected.logits, rtol=1e-6, atol=1e-6)
        hidden = torch.randn(3, policy.config.hidden_size)
        torch.testing.assert_close(reference.get_output_embeddings()(hidden),
                                   hidden @ pristine.lm_head.weight.T, rtol=1e-6, atol=1e-6)
        fused = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        z = expected.logits[:, :-1] / TEMPERATURE
        logp = torch.log_softmax(z.double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
        torch.testing.assert_close(fused.log_probs, logp.float().masked_fill(labels[:, 1:] == -100, 0), rtol=0,
                                   atol=1e-5)


def test_trl_entropy_bonus_entropy_filter_and_off_policy_mask(tmp_path, tokenizer, monkeypatch):
    """TRL's static entropy bonus, its entropy filter and its off-policy sequence mask, together on APA's tokens.

    num_iterations=2 reuses each generation batch for a second optimizer step, where the policy has moved off the
    sampler: the off-policy mask drops some negative-advantage completions there."""
    dropped = {}
    for mode in ("logits", "linear"):
        trainer, batches, unchanged = train(tmp_path / mode, tokenizer, monkeypatch, mode=mode, entropy_coef=0.05,
                                            top_entropy_quantile=0.5, off_policy_mask_threshold=1e-4,
                                            num_iterations=2)
        errors = check_against_float64(trainer, batches)
        print(f"{mode}: entropy bonus, filter and off-policy mask: loss vs float64, worst {max(errors):.2e}")
        assert not unchanged
        dropped[mode] = [b["off_policy_dropped"] for b in batches]
        assert all(b["apa"][1][3].sum() < b["inputs"]["completion_mask"].sum() for b in batches)  # the filter
        logged = [h for h in trainer.state.log_history if "apa/residual" in h]
        assert len(logged) == 2 and all({"entropy", "policy_loss", "loss", "entropy_coef"} <= h.keys() for h in logged)
    assert any(dropped["logits"]) and any(dropped["linear"]), dropped  # the off-policy mask dropped completions


def test_trl_adaptive_entropy_with_gradient_accumulation(tmp_path, tokenizer, monkeypatch):
    """TRL's adaptive bonus: no bonus until the first measurement; the window's token-mean entropy (both
    micro-batches) under entropy_target raises the coefficient, which the next step applies."""
    trainer, batches, unchanged = train(tmp_path, tokenizer, monkeypatch, mode="linear", use_adaptive_entropy=True,
                                        entropy_coef=0.01, entropy_coef_delta=0.02, entropy_target=100.0)
    check_against_float64(trainer, batches)
    assert trainer.entropy_coef == pytest.approx(0.05)  # 0.01 + 2 steps x 0.02
    coefs = [h["entropy_coef"] for h in trainer.state.log_history if "entropy_coef" in h]
    assert coefs == pytest.approx([0.03, 0.05])


@pytest.mark.parametrize("kind", list(KINDS))
def test_logit_transform_is_trls_and_the_models(tokenizer, kind):
    """Both modes' log-probs and entropies equal TRL's fused head's, for each kind of logit multiplier."""
    model = tiny_model(kind, tokenizer).eval()
    assert logit_transform(model.config) == pytest.approx(KINDS[kind][3])
    fused = copy.deepcopy(model)
    add_fused_lm_head(fused, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(0, len(tokenizer), (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    labels = input_ids.masked_fill(torch.arange(11) < 5, -100)
    with torch.no_grad():
        trl = fused(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        labels = labels[:, 1:]  # TRL scores position i's label i + 1
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        scale, softcap = logit_transform(model.config)
        from_logits = apa_fast.logprobs(outputs.logits[:, :-1], labels, temperature=TEMPERATURE, return_entropy=True)
        from_hidden = apa_fast.linear_logprobs(outputs.hidden_states[-1][:, :-1], model.get_output_embeddings().weight,
                                               labels, logit_scale=scale, logit_softcap=softcap,
                                               temperature=TEMPERATURE, return_entropy=True)
    for ours in (from_logits, from_hidden):
        torch.testing.assert_close(ours[0], trl.log_probs, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours[1], trl.entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, mode", [("falcon_h1", "linear"), ("hyperclovax", "linear"), ("qwen3_moe", "logits"),
                                        ("qwen3_moe", "linear"), ("gpt_oss", "logits"), ("gpt_oss", "linear")])
def test_trl_logit_multipliers_and_moe_models(tmp_path, tokenizer, monkeypatch, kind, mode):
    """Falcon-H1 (lm_head_multiplier 8) and HyperCLOVA X (logits_scaling as a multiplier) pass the first-step check
    in linear mode (logits mode reads the model's own logits: test_logit_transform_is_trls_and_the_models); MoE
    models with their default config get TRL's router aux loss added. One optimizer step."""
    model = tiny_model(kind, tokenizer)
    trainer, batches, unchanged = train(tmp_path, tokenizer, monkeypatch, mode=mode, model=model, max_steps=1)
    check_against_float64(trainer, batches)
    assert not unchanged
    logged = trainer.state.log_history[0]
    # Both micro-batches: the policy's log-probs are TRL's reference's (its own log_softmax: float32 rounding apart).
    assert abs(logged["apa/logp_minus_ref"]) <= 1e-6
    if kind in ("qwen3_moe", "gpt_oss"):
        assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.001
        assert logged["aux_loss"] > 0
    if mode == "linear":
        assert (batches[0]["head"][2]["logit_scale"], batches[0]["head"][2]["logit_softcap"]) == KINDS[kind][3]


def test_trl_first_step_check_catches_a_wrong_temperature(tmp_path, tokenizer):
    trainer = APAGRPOTrainer(model=tiny_llama(tokenizer), reward_funcs=reward_length, args=grpo_args(tmp_path),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.temperature = 1.0  # the policy's log-probs now use another temperature than the reference's 0.7
    with pytest.raises(RuntimeError, match="logp - ref_logp"):
        trainer.train()


@pytest.mark.parametrize("kwargs, message", [
    (dict(apa_lam=0.0), "apa_lam"),
    (dict(apa_mode="hidden"), "apa_mode"),
])
def test_trl_bad_arguments_raise(tmp_path, tokenizer, kwargs, message):
    overrides = kwargs.pop("args_overrides", {})
    with pytest.raises(ValueError, match=message):
        APAGRPOTrainer(model=tiny_llama(tokenizer), reward_funcs=reward_length, args=grpo_args(tmp_path, **overrides),
                       train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer, **kwargs)


def test_library_imports_without_trl():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import apa_fast, apa_fast.integrations\n"
            "try:\n    import apa_fast.integrations.trl\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "apa_fast[trl]" in out.stdout

"""APAGRPOTrainer inside the real TRL (the version pinned in constraints.txt), on a tiny random Llama.

Each run: 2 prompts x 4 generations per optimizer step, gradient accumulation 2, temperature 0.7, 8 completion
tokens, 2 optimizer steps. The first step's loss is recomputed in float64 from the very tensors the adapter
passed to apa_fast (recorded by wrapping apa_fast's functions), including the normaliser, which must be the
completion-token count of the whole accumulated batch.
"""

import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig

import apa_fast
from apa_fast.integrations.trl import APAGRPOTrainer
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
    """Wraps apa_fast's functions the adapter calls, keeping their arguments and results."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("logprobs", "linear_logprobs", "apa_loss_from_logprobs"):
            monkeypatch.setattr(apa_fast, name, self._wrap(name, getattr(apa_fast, name)))

    def _wrap(self, name, fn):
        fn = getattr(fn, "__wrapped__", fn)  # a second run in the same test wraps the original again

        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            # Copies: the optimizer updates the lm_head weight in place after this call.
            args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            self.calls.append((name, args, kwargs, out))
            return out
        recorded.__wrapped__ = fn
        return recorded

    def steps(self):
        """[(head call, loss call)] per training micro-batch, in order."""
        heads = [c for c in self.calls if c[0] != "apa_loss_from_logprobs"]
        losses = [c for c in self.calls if c[0] == "apa_loss_from_logprobs"]
        assert len(heads) == len(losses)
        return list(zip(heads, losses, strict=True))


def float64_logprobs(head_call):
    name, args, kwargs, _ = head_call
    if name == "logprobs":
        logits, labels = args
        z = logits.detach().double()
    else:
        hidden, weight, labels = args
        bias = kwargs.get("bias")
        z = hidden.detach().double() @ weight.detach().double().T
        if bias is not None:
            z = z + bias.detach().double()
        z = z * kwargs.get("logit_scale", 1.0)
        if kwargs.get("logit_softcap") is not None:
            z = kwargs["logit_softcap"] * torch.tanh(z / kwargs["logit_softcap"])
    logp = torch.log_softmax(z / kwargs["temperature"], dim=-1)
    counted = labels != -100
    logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~counted, 0.0)


def float64_loss(head_call, loss_call):
    _, (logp, ref, advantages, mask), kwargs, _ = loss_call
    assert advantages.dim() == 1  # TRL's group-relative advantages, one per completion, broadcast by apa_fast
    residual = float64_logprobs(head_call) - ref.double() - advantages.double()[:, None] / kwargs["lam"]
    return (residual.square() * mask.double()).sum() / torch.as_tensor(kwargs["normalizer"]).double()


def train(tmp_path, tokenizer, monkeypatch, *, mode, bf16, model=None, **overrides):
    recorder = Recorder(monkeypatch)
    policy = tiny_llama(tokenizer) if model is None else model
    trainer = APAGRPOTrainer(model=policy, reward_funcs=reward_length, args=grpo_args(tmp_path, bf16=bf16, **overrides),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                             apa_lam=LAM, apa_mode=mode)
    trainable = trainer.accelerator.unwrap_model(trainer.model)
    before = {name: p.detach().clone() for name, p in trainable.named_parameters() if p.requires_grad}
    trainer.train()
    unchanged = [name for name, p in trainable.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    return trainer, recorder.steps(), unchanged


def loss_errors(steps, accumulation=2):
    """Relative error of each micro-batch's loss against float64; checks each normaliser on the way."""
    errors = []
    for i, (head, loss_call) in enumerate(steps):
        # The normaliser spans the accumulated batch: every micro-batch of this optimizer step.
        window = steps[i - i % accumulation:i - i % accumulation + accumulation]
        window_tokens = sum(call[1][3].sum().item() for _, call in window)
        assert torch.as_tensor(loss_call[2]["normalizer"]).item() == pytest.approx(window_tokens)
        expected = float64_loss(head, loss_call).item()
        errors.append(abs(loss_call[3].item() - expected) / abs(expected))
    return errors


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trl_apa_both_modes(tmp_path, tokenizer, monkeypatch, bf16):
    first = {}
    for mode in ("logits", "linear"):
        trainer, steps, unchanged = train(tmp_path / mode, tokenizer, monkeypatch, mode=mode, bf16=bf16)
        assert len(steps) == 4  # 2 optimizer steps x 2 micro-batches
        head_call = steps[0][0]
        assert head_call[2]["temperature"] == TEMPERATURE
        if bf16 and mode == "logits":  # the lm_head ran under autocast: bf16 values (accelerate may upcast them)
            logits = head_call[1][0]
            assert torch.equal(logits.to(torch.bfloat16).to(logits.dtype), logits)
        errors = loss_errors(steps)
        # At the first step logp == ref_logp (the policy is pi_init); the second step's batch, sampled after an
        # update, has logp != ref_logp and so checks the log-probs themselves.
        print(f"{mode} {'bf16' if bf16 else 'fp32'}: loss vs float64, first step {errors[0]:.2e}, "
              f"worst micro-batch {max(errors):.2e}")
        assert max(errors) <= LOSS_TOL[mode, bf16]
        assert not unchanged, f"parameters without gradient: {unchanged}"
        logged = [h for h in trainer.state.log_history if "apa/residual" in h]
        assert len(logged) == 2 and all("apa/logp_minus_ref" in h for h in logged)
        first[mode] = steps[0]
    # Same seed, same weights: both modes score the same first completions, to rounding, and give the same loss.
    (linear_head, linear_loss), (logits_head, logits_loss) = first["linear"], first["logits"]
    torch.testing.assert_close(linear_head[1][2], logits_head[1][1])
    torch.testing.assert_close(linear_head[3], logits_head[3], rtol=0, atol=MODES_TOL[bf16])
    assert linear_loss[3].item() == pytest.approx(logits_loss[3].item(), rel=MODES_TOL[bf16])


def test_trl_reference_from_trl_when_beta_is_set(tmp_path, tokenizer, monkeypatch):
    """beta != 0: TRL loads the reference from the model's path; its log-probs feed APA unchanged."""
    tiny_llama(tokenizer).save_pretrained(tmp_path / "policy")
    trainer, steps, unchanged = train(tmp_path / "run", tokenizer, monkeypatch, mode="logits", bf16=False,
                                      model=str(tmp_path / "policy"), beta=0.04)
    assert trainer._apa_reference is None and trainer.ref_model is not None
    assert max(loss_errors(steps)) <= LOSS_TOL["logits", False]
    assert not unchanged


def test_trl_peft_reference_is_the_disabled_adapter(tmp_path, tokenizer, monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(tokenizer), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer, steps, unchanged = train(tmp_path, tokenizer, monkeypatch, mode="linear", bf16=False, model=model)
    assert trainer._apa_reference is None  # no copy: the first-step check passed against the disabled adapter
    assert not unchanged
    assert max(loss_errors(steps)) <= LOSS_TOL["linear", False]


def test_trl_first_step_check_catches_a_wrong_temperature(tmp_path, tokenizer):
    trainer = APAGRPOTrainer(model=tiny_llama(tokenizer), reward_funcs=reward_length, args=grpo_args(tmp_path),
                             train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    trainer.temperature = 1.0  # the policy's log-probs now use another temperature than the reference's 0.7
    with pytest.raises(RuntimeError, match="logp - ref_logp"):
        trainer.train()


@pytest.mark.parametrize("kwargs, message", [
    (dict(apa_lam=0.0), "apa_lam"),
    (dict(apa_mode="hidden"), "apa_mode"),
    (dict(args_overrides=dict(top_entropy_quantile=0.5)), "top_entropy_quantile"),
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

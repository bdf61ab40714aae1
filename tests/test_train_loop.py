"""The trainer end to end, in process: resume, NaN handling, crash-safe checkpoints, a real from_pretrained
path, the command line, and the fused against the unfused loss backend."""

import json

import pytest
import torch
from safetensors.torch import load_file

from apa_fast.train import checkpoint, cli
from apa_fast.train.config import TrainConfig
from apa_fast.train.trainer import train
from apa_fast.train.update import NonFiniteLossError

SMALL = dict(rollout_batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, max_prompt_tokens=32,
             save_every=2, tiny_width=32, tiny_heads=2, tiny_vocab=384)


def small(tmp_path, name, **fields):
    return TrainConfig(**{**SMALL, "output_dir": str(tmp_path / name), **fields})


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def policy_weights(run_dir):
    step_dir = checkpoint.latest_checkpoint(run_dir)
    return load_file(str(step_dir / "policy" / "model.safetensors"))


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    train(small(tmp_path, "straight", max_steps=4))
    train(small(tmp_path, "stopped", max_steps=2))
    train(small(tmp_path, "stopped", max_steps=4), resume=True)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "stopped")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["reward_mean"], a["kl"]) == pytest.approx((b["reward_mean"], b["kl"]), rel=1e-5, abs=1e-6)
    for name, tensor in policy_weights(tmp_path / "straight").items():
        torch.testing.assert_close(policy_weights(tmp_path / "stopped")[name], tensor, msg=name)
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").glob("step_*")) == [
        "step_000002", "step_000004"]


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def reward_turning_nan(prompts, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 3 else 1.0] * len(responses)

    with pytest.raises(NonFiniteLossError, match="step 3"):
        # eval_every 0: the held-out evaluation would call the reward too, and count.
        train(small(tmp_path, "nan", max_steps=4, reward=reward_turning_nan, eval_every=0))
    run = tmp_path / "nan"
    assert [m["step"] for m in metrics(run)] == [1, 2]
    assert checkpoint.latest_checkpoint(run).name == "step_000002"


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save_state = checkpoint.save_state

    def crash_on_step_4(obj, path):
        if ".tmp-step_000004" in str(path):
            raise OSError("disk full")
        real_save_state(obj, path)

    monkeypatch.setattr(checkpoint, "save_state", crash_on_step_4)
    with pytest.raises(OSError, match="disk full"):
        train(small(tmp_path, "crash", max_steps=4))
    run = tmp_path / "crash"
    assert checkpoint.latest_checkpoint(run).name == "step_000002"
    monkeypatch.setattr(checkpoint, "save_state", real_save_state)
    train(small(tmp_path, "crash", max_steps=4), resume=True)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert checkpoint.latest_checkpoint(run).name == "step_000004"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_pretrained_policy_and_reward_model_load_from_disk(tmp_path):
    from transformers import GPTJConfig, GPTJForCausalLM, GPTJForSequenceClassification

    from apa_fast.train.data import load_prompts
    from apa_fast.train.models import train_tokenizer

    tokenizer = train_tokenizer(load_prompts(TrainConfig().dataset), 384)
    config = GPTJConfig(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=16,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)
    for model, name in ((GPTJForCausalLM(config), "sft"), (GPTJForSequenceClassification(config), "rm")):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    cfg = small(tmp_path, "pretrained", max_steps=2, policy=str(tmp_path / "sft"), reward=str(tmp_path / "rm"),
                num_layers_unfrozen=1, algo="ppo", save_every=1)
    train(cfg)
    initial = load_file(str(tmp_path / "sft" / "model.safetensors"))
    trained = policy_weights(tmp_path / "pretrained")
    assert torch.equal(trained["transformer.h.0.mlp.fc_in.weight"], initial["transformer.h.0.mlp.fc_in.weight"])
    assert torch.equal(trained["transformer.wte.weight"], initial["transformer.wte.weight"])
    assert not torch.equal(trained["transformer.h.1.mlp.fc_in.weight"], initial["transformer.h.1.mlp.fc_in.weight"])


def test_command_line_writes_metrics_curves_and_resumes(tmp_path, capsys):
    run = tmp_path / "cli"
    # Also exercises stop strings in `generate` and the value head on the policy's own trunk.
    fields = {**SMALL, "stop": '["Human:"]', "critic_shares_trunk": "true"}
    sets = [arg for key, value in fields.items() for arg in ("--set", f"{key}={value}")]
    cli.main(["--output-dir", str(run), "--max-steps", "2", "--algo", "awr", *sets])
    with pytest.raises(SystemExit):
        cli.main(["--output-dir", str(run), "--max-steps", "3", *sets])
    assert "--resume" in capsys.readouterr().err
    cli.main(["--output-dir", str(run), "--max-steps", "3", "--algo", "awr", "--resume", *sets])
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3]
    required = {"step", "reward_mean", "kl", "entropy", "loss", "value_loss", "tokens_per_s", "gen_s", "update_s"}
    assert required <= set(rows[0]) and all(map(lambda m: all(map(_finite, m.values())), rows))
    assert (run / "curves.png").stat().st_size > 0


def _finite(value):
    return value == value and abs(value) != float("inf")


def test_fused_and_unfused_loss_backends_train_alike(tmp_path):
    runs = {}
    for backend in ("triton", "torch"):  # Triton through its interpreter on CPU (tests/conftest.py)
        runs[backend] = metrics_of = train(small(tmp_path, backend, max_steps=2, loss_backend=backend))
        assert len(metrics_of) == 2
    fused, unfused = runs["triton"], runs["torch"]
    for a, b in zip(fused, unfused, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-4)
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)


def test_state_files_round_trip_nests_of_tensors_and_scalars(tmp_path):
    state = {"masters": [torch.randn(3), torch.randn(2, 2)], "moments": [{"step": torch.tensor(4.0)}, {}],
             "python": (3, tuple(range(5)), None), 7: {"lr": 1e-3, "betas": [0.9, 0.95], "name": "adamw"}}
    checkpoint.save_state(state, tmp_path / "s.safetensors")
    loaded = checkpoint.load_state(tmp_path / "s.safetensors")
    assert loaded["python"] == state["python"] and loaded[7] == state[7]
    assert all(torch.equal(a, b) for a, b in zip(loaded["masters"], state["masters"], strict=True))
    assert torch.equal(loaded["moments"][0]["step"], state["moments"][0]["step"]) and loaded["moments"][1] == {}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_fused_lm_head_trains_like_the_logits_path(tmp_path, zero_stage):
    """`fused_lm_head: true` (apa_fast.linear_loss / linear_logprobs, the lm_head gathered under ZeRO-3) gives
    the losses of the logits path."""
    ds_config = tmp_path / f"zero{zero_stage}.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}}))
    runs = {
        fused: train(small(tmp_path, f"zero{zero_stage}-{fused}", max_steps=2, loss_backend="torch",
                           fused_lm_head=fused, deepspeed_config=str(ds_config)))
        for fused in (False, True)
    }
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-4)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)

"""APA, PPO and AWR without a critic (``advantage_estimator: group``, issue 22): the group baselines against
float64 references, and training with no critic built, trained or checkpointed (ZeRO-2, ZeRO-3, two processes)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train_distributed import RUNNER

from apa_fast.train import checkpoint
from apa_fast.train.advantages import group_advantages
from apa_fast.train.config import ConfigError, TrainConfig
from apa_fast.train.rollout import advantages_and_returns
from apa_fast.train.trainer import train

SMALL = dict(rollout_batch_size=4, minibatch_size=8, ppo_epochs=1, max_new_tokens=6, max_prompt_tokens=32,
             save_every=1, tiny_width=32, tiny_heads=2, tiny_vocab=384, advantage_estimator="group",
             eval_every=0)


def vowels(prompts, responses):
    """A dense reward (random-init responses rarely hold a cheerful word): the vowels of the response / 10."""
    return [sum(c in "aeiou" for c in response.lower()) / 10 for response in responses]


def reference(scores, k, form):
    """The three group advantages written out per group, in float64."""
    out = []
    for group in scores.double().view(-1, k).tolist():
        mean = sum(group) / k
        std = (sum((s - mean) ** 2 for s in group) / (k - 1)) ** 0.5
        for s in group:
            out.append({"mean": s - mean, "grpo": (s - mean) / (std + 1e-4),
                        "rloo": s - (sum(group) - s) / (k - 1)}[form])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("form", ["mean", "grpo", "rloo"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_group_advantages_match_float64(form, k):
    scores = torch.randn(7 * k) * 3 + 1
    scores[:k] = 0.5  # a group whose responses all score alike: no signal, advantage 0
    got = group_advantages(scores, k, form)
    assert got.dtype == torch.float32 and got.shape == scores.shape
    torch.testing.assert_close(got.double(), reference(scores, k, form), rtol=1e-6, atol=1e-6)
    assert got[:k].abs().max() == 0


def test_group_advantages_refuse_bad_input():
    with pytest.raises(ValueError, match="form"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1, "mean")
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2, "mean")


def test_advantage_is_constant_over_a_response_and_sees_ppos_penalty():
    cfg = TrainConfig(advantage_estimator="group", samples_per_prompt=3, group_advantage="mean",
                      whiten_advantages=False)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]],
                        dtype=torch.bool)
    rewards = torch.randn(mask.shape) * mask  # a score and a per-token penalty, as PPO's rollout places them
    advantages, returns = advantages_and_returns(rewards, torch.randn(mask.shape), mask, cfg)
    expected = reference(rewards.sum(-1), 3, "mean").float()[:, None] * mask
    torch.testing.assert_close(advantages, expected)
    assert (returns == 0).all()
    # Whitening only rescales: each group's baseline stays at 0.
    whitened, _ = advantages_and_returns(rewards, None, mask, TrainConfig(**{**vars(cfg), "whiten_advantages": True}))
    ratio = whitened[mask] / advantages[mask]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    assert ratio[0] > 0


def test_group_config_is_checked():
    assert TrainConfig(advantage_estimator="group").group_size == 4
    assert TrainConfig().group_size == 1
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        TrainConfig(advantage_estimator="group", samples_per_prompt=1)
    with pytest.raises(ConfigError, match="critic"):
        TrainConfig(advantage_estimator="group", critic="some/model")
    with pytest.raises(ConfigError, match="minibatch_size"):
        TrainConfig(rollout_batch_size=4, samples_per_prompt=3, minibatch_size=8)


@pytest.mark.parametrize(("algo", "zero_stage"), [("apa", 2), ("ppo", 3), ("awr", 2)])
def test_trains_without_a_critic(tmp_path, algo, zero_stage):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": zero_stage}}))
    cfg = TrainConfig(**{**SMALL, "output_dir": str(tmp_path / "run"), "algo": algo, "max_steps": 2,
                         "reward": vowels, "deepspeed_config": str(ds_config)})
    history = train(cfg)
    assert len(history) == 2 and all("value_loss" not in m for m in history)
    assert any(m["loss"] != 0 for m in history)
    step_dir = checkpoint.latest_checkpoint(cfg.output_dir)
    assert not (step_dir / "critic.safetensors").exists() and checkpoint.is_complete(step_dir)
    optimizer = checkpoint.load_state(step_dir / "optim_rank0.safetensors")
    policy = load_file(str(step_dir / "policy" / "model.safetensors"))
    # The optimizer's fp32 masters (ZeRO-2: a tensor per parameter, ZeRO-3: flat) hold the policy only.
    assert sum(m.numel() for m in optimizer["masters"]) == sum(t.numel() for t in policy.values())
    if algo == "apa":  # a checkpoint without a critic resumes
        history = train(TrainConfig(**{**vars(cfg), "max_steps": 3}), resume=True)
        assert [m["step"] for m in history] == [3]


@pytest.mark.slow
def test_two_processes_train_without_a_critic(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    launcher_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    fields = [f"{key}={value}" for key, value in SMALL.items()] + ["max_steps=2", "reward=test_train_group:vowels"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(script), str(tmp_path / "two"), *fields]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "two" / f"params_rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(name.startswith("policy.") for name in rank0)
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), f"ranks disagree on {name}"
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2] and any(m["loss"] != 0 for m in rows)
    assert not (checkpoint.latest_checkpoint(tmp_path / "two") / "critic.safetensors").exists()

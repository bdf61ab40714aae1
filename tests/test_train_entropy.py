"""The trainer's entropy end to end (metrics.jsonl, the log line, the bonus in the logged loss) and the config's
checks of the loss ops' numbers; `policy_loss` itself (bonus, entropy, gradient, both lm_head paths) is checked
against float64 in tests/test_train_rollout.py."""

import json
import math

import pytest
from test_train_loop import metrics, small

from apa_fast.train import checkpoint, cli
from apa_fast.train.config import ConfigError, TrainConfig, changed_fields, config_dict
from apa_fast.train.trainer import train


def test_update_logs_entropy_and_the_bonus_shifts_the_loss_by_it(tmp_path, capsys):
    """One step whose update is one minibatch (so its loss is taken before any optimizer step): with entropy_coef c
    the logged loss is the coef-0 run's minus c * its logged entropy, on the same rollout. PPO, the bonus run
    from hidden states (`fused_lm_head`, `apa_fast.linear_ppo_loss`): the two paths give the same figures."""
    one_pass = dict(max_steps=1, rollout_batch_size=8, minibatch_size=8, ppo_epochs=1, algo="ppo")
    plain = train(small(tmp_path, "plain", **one_pass))
    bonus = train(small(tmp_path, "bonus", entropy_coef=0.5, fused_lm_head=True, **one_pass))
    policy_config = checkpoint.latest_checkpoint(tmp_path / "plain") / "policy" / "config.json"
    vocab = json.loads(policy_config.read_text())["vocab_size"]
    (a,), (b,) = plain, bonus
    assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)  # the same rollout
    assert 0 < a["entropy"] <= math.log(vocab) and math.isfinite(a["entropy"])
    # float32 sums over the vocabulary in another order (chunked projection): a few ulps.
    assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
    assert b["loss"] == pytest.approx(a["loss"] - 0.5 * a["entropy"], rel=1e-5, abs=1e-5)
    assert metrics(tmp_path / "bonus") == bonus  # metrics.jsonl carries it
    assert f"entropy {b['entropy']:.3f} |" in capsys.readouterr().out
    assert (tmp_path / "bonus" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("field, value", [
    ("apa_lam", 1e-9), ("apa_lam", 2e6), ("awr_lam", 1e-7), ("awr_max_weight", 1e7), ("ppo_clip_eps", 1e-9),
    ("ppo_clip_eps", 0.0), ("entropy_coef", 2e6), ("entropy_coef", -1.5e6),
])
def test_config_refuses_what_the_loss_ops_would_refuse(field, value):
    with pytest.raises(ConfigError, match=rf"config field '{field}': {field} must be in \[") as info:
        TrainConfig(**{field: value})
    assert info.value.field_name == field


@pytest.mark.parametrize("field, value", [("apa_lam", 1e-6), ("awr_max_weight", 1e6), ("entropy_coef", -0.01),
                                          ("entropy_coef", 1e6), ("ppo_clip_eps", 5.0)])
def test_config_accepts_the_ends_of_the_ops_ranges(field, value):
    assert getattr(TrainConfig(**{field: value}), field) == value


def test_command_line_refuses_an_out_of_range_lam_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--output-dir", str(tmp_path / "run"), "--set", "apa_lam=1e-9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set apa_lam=1e-9" in err and "'apa_lam'" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_entropy_coef_may_not_change_on_resume():
    saved = config_dict(TrainConfig())
    assert changed_fields(saved, TrainConfig(entropy_coef=0.01)) == {"entropy_coef": (0.0, 0.01)}
    del saved["entropy_coef"]  # a checkpoint written before the field existed: not compared
    assert changed_fields(saved, TrainConfig(entropy_coef=0.01)) == {}

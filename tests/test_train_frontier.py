"""The reward-KL frontier command (issue 15) and PPO's adaptive KL controller."""

import json
import re

import pytest
from train_runs import SETS, SMALL

from apa_fast.train import cli, frontier
from apa_fast.train.config import TrainConfig
from apa_fast.train.frontier import GridError, parse_grid, plan
from apa_fast.train.rollout import KLController
from apa_fast.train.trainer import train

# --- grid strings ---

@pytest.mark.parametrize(("spec", "expected"), [
    ("apa:apa_lam=0.03,0.1,1", ("apa", "apa_lam", [0.03, 0.1, 1])),
    (" ppo : ppo_kl_coef = 1e-2, 0.05 ", ("ppo", "ppo_kl_coef", [0.01, 0.05])),
    ("awr:awr_lam=3", ("awr", "awr_lam", [3])),
    ("apa:lr=1e-3,3e-3", ("apa", "lr", [1e-3, 3e-3])),
])
def test_grid_strings_parse(spec, expected):
    assert parse_grid(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), [
    ("apa_lam=0.1", "expected ALGORITHM:FIELD=V1,V2"),
    ("apa:apa_lam", "expected ALGORITHM:FIELD=V1,V2"),
    ("dpo:apa_lam=0.1", "algorithm 'dpo'"),
    ("apa:lam=0.1", "'lam' is not a numeric config field"),
    ("apa:stop=1", "'stop' is not a numeric config field"),
    ("apa:seed=1,2", "'seed' is not a numeric config field to sweep \\(seeds: --seeds\\)"),
    ("apa:ppo_kl_coef=0.1", "ppo_kl_coef is a parameter of ppo"),
    ("apa:apa_lam=", "'' is not a number"),
    ("apa:apa_lam=0.1,,1", "'' is not a number"),
    ("apa:apa_lam=0.1,big", "'big' is not a number"),
    ("apa:apa_lam=true", "'true' is not a number"),
    ("apa:apa_lam=nan", "'nan' is not a number"),
    ("apa:apa_lam=0.1,0.10", "value 0.1 appears twice"),
])
def test_bad_grid_strings_are_named(spec, reason):
    with pytest.raises(GridError, match=rf"^--grid {re.escape(repr(spec))}: {reason}"):
        parse_grid(spec)


@pytest.mark.parametrize(("specs", "reason"), [
    (["apa:apa_lam=-1,1"], r"config field 'apa_lam': apa_lam must be in \[1e-06, 1e\+06\], got -1.0"),
    (["ppo:ppo_kl_horizon=0.5"], "config field 'ppo_kl_horizon' must be of type int"),
    (["apa:apa_lam=1", "apa:apa_lam=1"], "apa apa_lam=1 seed 0 is already in another grid"),
])
def test_grid_values_are_validated_as_config_fields(tmp_path, specs, reason):
    with pytest.raises(GridError, match=rf"--grid '.*': {reason}"):
        plan(TrainConfig(), specs, 2, tmp_path)


def test_plan_names_every_point_and_keeps_the_shared_fields(tmp_path):
    points = plan(TrainConfig(seed=3, lr=2e-3), ["apa:apa_lam=0.1,1", "awr:awr_lam=3"], 2, tmp_path)
    assert [p.name for p, _ in points] == ["apa_apa_lam=0.1_seed3", "apa_apa_lam=0.1_seed4", "apa_apa_lam=1_seed3",
                                           "apa_apa_lam=1_seed4", "awr_awr_lam=3_seed3", "awr_awr_lam=3_seed4"]
    _, cfg = points[-1]
    assert (cfg.algo, cfg.awr_lam, cfg.seed, cfg.lr, cfg.output_dir) == ("awr", 3.0, 4, 2e-3,
                                                                        str(tmp_path / "awr_awr_lam=3_seed4"))


GROUP = "apa+advantage_estimator=group+rollout_batch_size=8"


@pytest.mark.parametrize(("spec", "expected"), [
    (f"{GROUP}:apa_lam=0.1,1", (GROUP, "apa_lam", [0.1, 1])),
    (" apa + advantage_estimator = group + rollout_batch_size=8 : apa_lam=0.1", (GROUP, "apa_lam", [0.1])),
    ("ppo+samples_per_prompt=2+advantage_estimator=group:ppo_kl_coef=0.05",
     ("ppo+samples_per_prompt=2+advantage_estimator=group", "ppo_kl_coef", [0.05])),
    ("apa+reward=apa_fast.train.rewards:honest_cheer:apa_lam=1",  # the swept part follows the last colon
     ("apa+reward=apa_fast.train.rewards:honest_cheer", "apa_lam", [1])),
])
def test_grids_with_fixed_settings_parse(spec, expected):
    assert parse_grid(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), [
    ("apa+group:apa_lam=0.1", "fixed setting 'group' is not KEY=VALUE"),
    ("apa+estimator=group:apa_lam=0.1", "fixed setting 'estimator' is not a config field"),
    ("apa+seed=3:apa_lam=0.1", "fixed setting seed is given by --seeds"),
    ("apa+apa_lam=1:apa_lam=0.1", "fixed setting apa_lam is given as the swept field"),
    ("apa+lr=1e-3+lr=2e-3:apa_lam=0.1", "fixed setting lr is given twice"),
    ("apa+save_every=5:apa_lam=0.1", "fixed setting save_every does not change what a run learns"),
    ("apa+ppo_kl_coef=0.1:apa_lam=0.1", "ppo_kl_coef is a parameter of ppo, it does not change apa"),
    ("apa+dataset=a/b.jsonl:apa_lam=0.1", "fixed setting 'dataset=a/b.jsonl': the value names the points' folders"),
])
def test_bad_fixed_settings_are_named(spec, reason):
    with pytest.raises(GridError, match=rf"^--grid {re.escape(repr(spec))}: {reason}"):
        parse_grid(spec)


def test_a_series_with_fixed_settings_runs_and_plots_beside_the_plain_one(tmp_path):
    points = plan(TrainConfig(), ["apa:apa_lam=0.1", f"{GROUP}:apa_lam=0.1"], 1, tmp_path)
    assert [p.name for p, _ in points] == ["apa_apa_lam=0.1_seed0", f"{GROUP}_apa_lam=0.1_seed0"]
    (plain, gae), (group_point, group) = points
    assert (gae.advantage_estimator, gae.sequences_per_step) == ("gae", 32)
    assert (group.advantage_estimator, group.rollout_batch_size, group.sequences_per_step) == ("group", 8, 32)
    assert (group_point.algorithm, group.algo, group.apa_lam) == ("apa", "apa", 0.1)
    with pytest.raises(GridError, match="needs samples_per_prompt >= 2"):  # the settings are validated too
        plan(TrainConfig(), ["apa+advantage_estimator=group+samples_per_prompt=1:apa_lam=0.1"], 1, tmp_path)

    def record(point, reward, kl):
        return {"algorithm": point.algorithm, "series": point.series, "parameter": point.parameter,
                "value": point.value, "seed": point.seed, "steps": 40, "reward": reward, "reward_std": 0.0, "kl": kl,
                "kl_std": 0.0, "wall_s": 1.0, "evaluator": "eval_reward", "heldout_reward": reward,
                "heldout_train_reward": reward, "heldout_kl": kl, "heldout_entropy": 5.0, "heldout_distinct_2": 0.9,
                "heldout_curve": [[0, 0.0], [320, reward]]}

    records = [record(plain, 0.7, 12.0), record(group_point, 0.4, 3.0)]
    assert frontier.efficiency_points(records) == {("apa", "apa_lam"): 0.1, (GROUP, "apa_lam"): 0.1}
    frontier.write_outputs(tmp_path, records, "apa-train frontier ...", "test")
    table = (tmp_path / "frontier.md").read_text()
    assert "## APA: apa_lam" in table and "## APA advantage_estimator=group, rollout_batch_size=8: apa_lam" in table
    assert "| 0.1 | 0.700 | 12.00 |" in table and "| 0.1 | 0.400 | 3.00 |" in table
    assert "- APA advantage_estimator=group, rollout_batch_size=8 apa_lam=0.1: 0: 0.000, 320: 0.400" in table
    assert (tmp_path / "frontier.png").stat().st_size and (tmp_path / "efficiency.png").stat().st_size


@pytest.mark.parametrize("argv", [["--grid", "apa:apa_lam=0,1"], ["--grid", "apa"], ["--grid", "apa:apa_lam=1",
                                  "--set", "save_every=0"], ["--grid", "apa:apa_lam=1", "--jobs", "0"]])
def test_command_line_errors_exit_2_in_one_line_before_any_run(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(["frontier", "--output-dir", str(tmp_path / "sweep"), *argv])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


# --- the sweep end to end ---

def test_frontier_runs_resumes_skips_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["frontier", "--output-dir", str(out), "--grid", "apa:apa_lam=0.1", "--grid", "awr:awr_lam=1",
            "--seeds", "1", "--max-steps", "2", "--jobs", "2", *SETS]
    # An interrupted point: its first step ran (and was checkpointed) before the sweep.
    interrupted = out / "awr_awr_lam=1_seed0"
    train(TrainConfig(**{**SMALL, "algo": "awr", "max_steps": 1, "save_every": 1, "output_dir": str(interrupted)}))

    cli.main(argv)
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if re.match(r"\[\d+/2\] ", line)]
    assert len(progress) == 2 and all(re.search(r"reward [\d.]+, kl -?[\d.]+ \(2 steps, \d+ s\)", p)
                                      for p in progress)
    assert "steps 2..2" in (interrupted / "train.log").read_text()  # resumed, not restarted

    records = [json.loads(line) for line in (out / "frontier.jsonl").read_text().splitlines()]
    assert [(r["algorithm"], r["parameter"], r["value"], r["seed"], r["steps"]) for r in records] == [
        ("apa", "apa_lam", 0.1, 0, 2), ("awr", "awr_lam", 1, 0, 2)]
    keys = {"algorithm", "series", "parameter", "value", "seed", "steps", "reward", "reward_std", "kl", "kl_std",
            "wall_s",
            # the held-out evaluations (on by default; tests/test_train_eval.py checks their values)
            "evaluator", "heldout_reward", "heldout_train_reward", "heldout_kl", "heldout_entropy",
            "heldout_distinct_2", "heldout_curve"}
    assert all(set(r) == keys and 0 <= r["reward"] <= 1 and r["reward_std"] >= 0 and r["wall_s"] > 0
               for r in records)
    markdown = (out / "frontier.md").read_text()
    assert "## APA: apa_lam" in markdown and "## AWR: awr_lam" in markdown and "| 0.1 | " in markdown
    assert "apa-train frontier --output-dir" in markdown
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("apa_apa_lam=0.1_seed0", "awr_awr_lam=1_seed0"):  # each point: an ordinary run directory
        assert (out / name / "config.yaml").is_file() and (out / name / "checkpoints" / "latest").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    cli.main(argv)  # everything finished: nothing runs, the outputs are rewritten from the runs
    assert sum("finished earlier" in line for line in capsys.readouterr().out.splitlines()) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == stamps
    assert [json.loads(line) for line in (out / "frontier.jsonl").read_text().splitlines()] == records

    with pytest.raises(SystemExit) as info:  # same folder, other settings: refused, naming the point's config
        cli.main([*argv, "--set", "lr=0.01"])
    assert info.value.code == 2 and "config.yaml: this point ran with other values of ['lr']" in (
        capsys.readouterr().err)


def test_failed_point_is_reported_and_the_others_still_run(tmp_path, capsys):
    """A point whose run fails (here: its run directory holds a dangling `latest`) gets a FAILED line naming its
    log; the sweep finishes the others, writes their outputs and exits 1."""
    out = tmp_path / "sweep"
    broken = out / "apa_apa_lam=1_seed0" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "latest").write_text("step_000009\n")
    with pytest.raises(SystemExit) as info:
        frontier.main(["--output-dir", str(out), "--grid", "apa:apa_lam=0.1,1", "--seeds", "1", "--max-steps", "1",
                       *SETS])
    assert info.value.code == 1
    text = capsys.readouterr().out
    assert re.search(r"apa apa_lam=1 seed 0: FAILED: CheckpointError: .*no complete checkpoint.*train\.log", text)
    assert [json.loads(line)["value"] for line in (out / "frontier.jsonl").read_text().splitlines()] == [0.1]


# --- PPO's adaptive KL controller (Ziegler et al. 2019) ---

def test_fixed_kl_coefficient_does_not_move():
    control = KLController(TrainConfig(algo="ppo", ppo_kl_coef=0.2))
    for kl in (0.0, 6.0, 100.0):
        control.update(kl, 32)
    assert control.value == 0.2


@pytest.mark.parametrize(("kl", "factor"), [(6.0, 1.0), (7.2, 1 + 0.2 * 32 / 10000), (100.0, 1 + 0.2 * 32 / 10000),
                                            (5.4, 1 - 0.1 * 32 / 10000), (0.0, 1 - 0.2 * 32 / 10000)])
def test_adaptive_kl_coefficient_follows_ziegler_et_al(kl, factor):
    cfg = TrainConfig(algo="ppo", ppo_adaptive_kl=True)
    assert (cfg.ppo_kl_coef, cfg.ppo_kl_target, cfg.ppo_kl_horizon) == (0.05, 6.0, 10000)
    control = KLController(cfg)
    control.update(kl, 32)
    control.update(kl, 32)
    assert control.value == pytest.approx(0.05 * factor**2, rel=1e-12)


def test_adaptive_kl_coefficient_is_logged_checkpointed_and_resumed(tmp_path):
    fields = {**SMALL, "algo": "ppo", "ppo_adaptive_kl": True, "ppo_kl_target": 0.5, "ppo_kl_horizon": 10,
              "save_every": 1}
    straight = train(TrainConfig(**fields, max_steps=3, output_dir=str(tmp_path / "straight")))
    expected = KLController(TrainConfig(**fields))
    for row in straight:  # each step's rollout used the coefficient the previous steps' KL gave
        assert row["kl_coef"] == pytest.approx(expected.value, rel=1e-12)
        expected.update(row["kl"], fields["rollout_batch_size"])
    assert straight[0]["kl_coef"] == 0.05 and straight[2]["kl_coef"] != 0.05
    state = json.loads((tmp_path / "straight" / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["kl_coef"] == pytest.approx(expected.value, rel=1e-12)

    train(TrainConfig(**fields, max_steps=2, output_dir=str(tmp_path / "resumed")))
    resumed = train(TrainConfig(**fields, max_steps=3, output_dir=str(tmp_path / "resumed")), resume=True)
    assert resumed[0]["kl_coef"] == pytest.approx(straight[2]["kl_coef"], rel=1e-9)
    assert "kl_coef" not in train(TrainConfig(**SMALL, max_steps=1, output_dir=str(tmp_path / "apa")))[0]

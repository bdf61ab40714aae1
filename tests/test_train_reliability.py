"""Trainer reliability, by class of defect (issue 13): every config field validated before any work; no path
deletes a complete checkpoint unless asked to start over; resume without a usable ``latest``; torn metrics;
errors that name the file, one line from the command line; a missing matplotlib."""

import json
import shutil
import sys

import pytest
from train_runs import SETS, run_fixtures, small

from apa_fast.train import checkpoint, cli
from apa_fast.train.checkpoint import CheckpointError, prune, truncate_metrics
from apa_fast.train.config import ConfigError, TrainConfig, load_config, read_deepspeed_json
from apa_fast.train.trainer import train


def steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def listing(run_dir):
    """Every file under ``run_dir`` with its size and modification time: 'touches nothing' compares these. The
    lock file is left out: each trainer writes its pid there, whatever it then does."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


finished_run, run = run_fixtures(steps=4)  # checkpoints at steps 2 and 4


# --- class 1: every config field is checked (type, range) before any work starts ---

BAD_FIELDS = [
    ("save_every", 0), ("save_every", -1), ("save_every", True), ("save_every", 1.5), ("keep_checkpoints", 0),
    ("keep_checkpoints", -2), ("max_steps", True), ("max_steps", "10"), ("lr", True), ("lr", "fast"),
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0), ("apa_lam", 0.0), ("apa_lam", -0.1), ("apa_lam", False),
    ("awr_lam", 0), ("ppo_kl_coef", -0.01), ("ppo_kl_target", 0), ("ppo_kl_horizon", 0), ("ppo_adaptive_kl", 1),
    ("top_p", 0.0), ("top_p", 1.5), ("temperature", -1), ("top_k", -1), ("gamma", 1.5), ("gae_lambda", -0.1),
    ("betas", [0.9]), ("betas", [1.0, 0.9]), ("betas", "0.9,0.95"), ("stop", [""]), ("stop", "Human:"),
    ("stop", [3]), ("algo", "dpo"), ("loss_backend", "cuda"), ("tiny_heads", 0), ("tiny_vocab", 100),
    ("seed", -1), ("seed", 2**40), ("warmup_steps", -1), ("num_layers_unfrozen", -2), ("bf16", 1),
    ("whiten_advantages", "yes"), ("policy", ""), ("policy", 7), ("output_dir", None), ("reward", 3),
    ("minibatch_size", 0), ("rollout_batch_size", 0), ("ppo_epochs", 0), ("max_grad_norm", 0),
    ("weight_decay", -1e-6), ("vf_coef", -1),
]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS, ids=[f"{n}={v!r}" for n, v in BAD_FIELDS])
def test_bad_field_values_are_refused_naming_the_field(name, value):
    with pytest.raises(ConfigError, match=name) as info:
        TrainConfig(**{name: value})
    assert info.value.field_name == name


@pytest.mark.parametrize(("fields", "match"), [
    (dict(rollout_batch_size=10, minibatch_size=4), "multiple of minibatch_size"),
    (dict(tiny_width=30, tiny_heads=4), "tiny_width"),
    (dict(advantage_estimator="group", samples_per_prompt=1), "samples_per_prompt >= 2"),
    (dict(advantage_estimator="group", critic="some/critic"), "builds no critic"),
    (dict(eval_every=5, eval_holdout=0), "needs held-out prompts"),
])
def test_inconsistent_fields_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**fields)


def test_accepted_values_are_normalised():
    cfg = load_config(None, ["lr=1e-4", "apa_lam=1", "betas=[0, 0.5]", "stop=['Human:']", "reward=pkg.mod:fn"])
    assert (cfg.lr, cfg.apa_lam, cfg.betas, cfg.stop) == (1e-4, 1.0, [0.0, 0.5], ["Human:"])
    assert isinstance(cfg.apa_lam, float) and all(isinstance(b, float) for b in cfg.betas)
    assert TrainConfig(reward=lambda prompts, responses: [0.0] * len(responses)).seed == 0


def test_errors_name_the_file_or_flag_a_value_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("keep_checkpoints: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: config field 'keep_checkpoints' must be >= 1, got 0$"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"^--set save_every=0: config field 'save_every'"):
        load_config(str(path), ["keep_checkpoints=1", "save_every=0"])
    with pytest.raises(ConfigError, match=r"^--max-steps: config field 'max_steps'"):
        load_config(None, max_steps=0)
    with pytest.raises(ConfigError, match=r"^--set learning_rate=1: unknown config field"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ConfigError, match=r"--set 'lr=\[': the value is not valid YAML: line 1"):
        load_config(None, ["lr=["])


@pytest.mark.parametrize(("text", "match"), [
    ("lr: [1, 2\n", "line 2"),  # unclosed list
    ("- lr\n- seed\n", "expected a mapping"),
    ("\tlr: 1\n", "line 1"),
    (b"\xff\xfe lr: 1", "codec"),
])
def test_bad_yaml_file_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=rf"^{path}: .*{match}") as info:
        load_config(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_unreadable_config_file_is_named(tmp_path, which):
    path = tmp_path / "c.yaml"
    if which == "directory":
        path.mkdir()
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read the config"):
        load_config(str(path))


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]"])
def test_bad_deepspeed_file_is_named_before_any_work(tmp_path, content):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=rf"deepspeed_config {path}"):
        read_deepspeed_json(str(path))
    with pytest.raises(ConfigError, match=rf"deepspeed_config {path}"):
        train(small(tmp_path / "run", deepspeed_config=str(path)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["--set", "save_every=0"], ["--set", "keep_checkpoints=-1"], ["--max-steps", "0"], ["--set", "lr=true"],
    ["--config", "missing.yaml"], ["--set", "nope=1"], ["--set", "deepspeed_config=missing.json"],
])
def test_command_line_config_errors_are_one_line_exit_2_and_do_no_work(tmp_path, capsys, argv):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["--output-dir", str(out), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("apa-train: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["--output-dir", str(tmp_path), "--resume", "--overwrite"])
    assert info.value.code == 2
    with pytest.raises(ConfigError, match="exclude"):
        train(small(tmp_path / "run", max_steps=1), resume=True, overwrite=True)


# --- class 2: no path deletes a complete checkpoint unless the user asked to start over ---

def test_missing_latest_resumes_from_the_newest_complete_checkpoint(run, capsys):
    (run / "checkpoints" / "latest").unlink()
    before = listing(run)
    with pytest.raises(FileExistsError, match="--resume"):  # no flag: refuse, whatever `latest` says
        train(small(run, max_steps=6))
    assert listing(run) == before
    train(small(run, max_steps=6), resume=True)
    out = capsys.readouterr().out
    assert "is missing: resuming from the newest complete checkpoint, step_000004" in out
    assert "steps 5..6" in out and steps(run) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004", "step_000006"]
    assert checkpoint.latest_checkpoint(run).name == "step_000006"


@pytest.mark.parametrize("damage", ["dangling", "garbage", "outside", "binary", "incomplete_target"])
def test_unusable_latest_falls_back_to_a_complete_checkpoint(run, damage):
    root = run / "checkpoints"
    pointer = {"dangling": "step_000099\n", "garbage": "hello\n", "outside": "../../etc\n",
               "binary": b"\xff\x00\xfe", "incomplete_target": "step_000004\n"}[damage]
    if damage == "incomplete_target":
        (root / "step_000004" / "critic.safetensors").unlink()
    (root / "latest").write_bytes(pointer if isinstance(pointer, bytes) else pointer.encode())
    expected = "step_000002" if damage == "incomplete_target" else "step_000004"
    path, note = checkpoint.resume_point(run)
    assert path.name == expected and "not a complete checkpoint" in note
    assert train(small(run, max_steps=5), resume=True)[0]["step"] == int(expected[-1]) + 1


@pytest.mark.parametrize("state", ["dangling_latest", "only_incomplete_steps"])
def test_resume_without_a_complete_checkpoint_refuses_and_touches_nothing(run, state, capsys):
    root = run / "checkpoints"
    for step_dir in root.glob("step_*"):
        if state == "dangling_latest":
            shutil.rmtree(step_dir)  # what keep_checkpoints=0 used to leave
        else:
            (step_dir / "trainer_state.json").write_text("{torn")
    before = listing(run)
    with pytest.raises(CheckpointError, match="no complete checkpoint is left.*--overwrite"):
        train(small(run, max_steps=6), resume=True)
    with pytest.raises(FileExistsError):
        train(small(run, max_steps=6))
    assert listing(run) == before
    with pytest.raises(SystemExit) as info:
        cli.main(["--output-dir", str(run), "--resume", *SETS])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("state", ["dangling_latest", "corrupt_state", "checkpoints_is_a_file", "corrupt_metrics"])
def test_overwrite_always_starts_over(run, state):
    root = run / "checkpoints"
    if state == "dangling_latest":
        for step_dir in root.glob("step_*"):
            shutil.rmtree(step_dir)
    elif state == "corrupt_state":
        (root / "step_000004" / "trainer_state.json").write_bytes(b"\x00" * 10)
    elif state == "checkpoints_is_a_file":
        shutil.rmtree(root)
        root.write_text("not a directory")
    else:
        (run / "metrics.jsonl").write_text("garbage\n{\n")
    train(small(run, max_steps=2, save_every=1, keep_checkpoints=1), overwrite=True)
    assert steps(run) == [1, 2]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002"]
    assert checkpoint.latest_checkpoint(run).name == "step_000002"


def test_pruning_never_removes_the_checkpoint_just_written_nor_later_ones(run):
    """A crash between writing step 4 and pointing `latest` at it: the run resumes from step 2; with
    keep_checkpoints=1 the step-3 checkpoint it writes stays, and so does the step-4 one it will redo."""
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    train(small(run, max_steps=3, save_every=1, keep_checkpoints=1), resume=True)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]
    assert checkpoint.latest_checkpoint(run).name == "step_000003"
    assert steps(run) == [1, 2, 3]


@pytest.mark.parametrize(("existing", "step", "keep", "left"), [
    ([1, 2, 3], 4, 1, [4]),
    ([1, 2, 3], 4, 2, [3, 4]),
    ([1, 2, 3], 4, 10, [1, 2, 3, 4]),
    ([2, 6], 4, 1, [4, 6]),  # step 6: a later checkpoint, redone when the run gets there
    ([], 1, 1, [1]),
])
def test_prune_keeps_the_newest_up_to_the_current_step(tmp_path, existing, step, keep, left):
    for s in [*existing, step]:
        (tmp_path / f"step_{s:06d}").mkdir()
    (tmp_path / ".tmp-step_000009").mkdir()
    (tmp_path / "notes").mkdir()  # not a checkpoint: never touched
    prune(tmp_path, step, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f"step_{s:06d}" for s in left), "notes"])


def test_resume_past_max_steps_runs_nothing_and_changes_nothing(run, capsys):
    before = listing(run)
    assert train(small(run, max_steps=3), resume=True) == []
    assert "already at step 4" in capsys.readouterr().out
    assert listing(run) == before


# --- class 3: a torn metrics.jsonl (power loss, full disk) ---

@pytest.mark.parametrize("tail", [b'{"step": 5, "reward_mean": 0.', b"\x00" * 64, b'{"step": 5}garbage\n', b"{"])
def test_torn_last_metrics_line_is_dropped_and_the_run_continues(run, capsys, tail):
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(tail)
    train(small(run, max_steps=5), resume=True)
    assert "dropped a torn last line (line 5" in capsys.readouterr().out
    assert steps(run) == [1, 2, 3, 4, 5]


def test_bad_metrics_line_before_the_end_is_refused_naming_the_line(run):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    before = listing(run)
    with pytest.raises(CheckpointError, match=rf"{path}: line 2 is not a metrics record"):
        train(small(run, max_steps=5), resume=True)
    assert listing(run) == before


@pytest.mark.parametrize(("content", "last_step", "kept", "torn"), [
    ('{"step": 1}\n{"step": 2}\n{"step": 3}\n', 2, [1, 2], False),
    ('{"step": 1}\n{"step": 2, "re\n\n  \n', 5, [1], True),  # blank lines after the torn one
    ('{"step": 1}\n\n{"step": 2}\n{"st', 5, [1, 2], True),
    ('{"step": 1}\n{"step": "2"}', 5, [1], True),
    ('{"step": 1}\n[2]\n', 5, [1], True),
    ("anything at all\n{{{\n", 0, [], False),  # starting over: nothing is parsed
])
def test_truncate_metrics(tmp_path, content, last_step, kept, torn):
    path = tmp_path / "metrics.jsonl"
    path.write_text(content)
    note = truncate_metrics(path, last_step)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == kept
    assert (note is not None) == torn
    assert path.read_text().endswith("\n") or not kept


# --- class 4: a corrupt checkpoint's error names the file ---

@pytest.mark.parametrize("name", ["critic.safetensors", "policy/model.safetensors", "optim_rank0.safetensors",
                                  "rng_rank0.safetensors"])
def test_corrupt_checkpoint_file_is_named(run, name, capsys):
    damaged = run / "checkpoints" / "step_000004" / name
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"^{damaged}: cannot be read"):
        train(small(run, max_steps=6), resume=True)
    with pytest.raises(SystemExit) as info:
        cli.main(["--output-dir", str(run), "--max-steps", "6", "--resume",
                  *SETS])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(f"apa-train: error: {damaged}: ") and err.count("\n") == 1


def test_checkpoint_of_another_model_is_refused_naming_it(run):
    """Settings saved with weights of another model (a hand-edited trainer_state.json): a changed tiny_layers is
    refused as a changed config (tests/test_train_guards.py); here the saved config says 3 layers too."""
    path = run / "checkpoints" / "step_000004" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["config"]["tiny_layers"] = 3
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="step_000004: checkpoint does not match the model"):
        train(small(run, max_steps=6, tiny_layers=3), resume=True)


# --- class 5: optional dependencies ---

def test_missing_matplotlib_skips_the_plot_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    run = tmp_path / "run"
    assert len(train(small(run, max_steps=1))) == 1
    out = capsys.readouterr().out
    assert out.index("matplotlib is not installed") < out.index("step 1/1")  # warned at start-up
    assert steps(run) == [1] and not (run / "curves.png").exists()

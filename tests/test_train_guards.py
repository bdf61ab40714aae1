"""Trainer guards (issue 19, items 4, 5, 7, 11, 12), by class: the run directory locked against a second trainer;
Ctrl-C on a frontier of several jobs stops it and its workers; resume refuses a changed config; everything the
config names checked before DeepSpeed starts; frontier grids with exact folder names."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_runs import SETS, run_fixtures, small

from apa_fast.train import cli, frontier, trainer
from apa_fast.train.checkpoint import CheckpointError, latest_checkpoint, run_dir_lock
from apa_fast.train.config import ConfigError, TrainConfig, check_sources
from apa_fast.train.frontier import GridError, parse_grid, plan
from apa_fast.train.trainer import train

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def one_line_exit_2(capsys, argv):
    """Run the command line in-process; returns its stderr, checked to be one line with exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def subprocess_env():
    """This process's environment without the rendezvous of in-process runs (a child would reuse its port)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


finished_run, run = run_fixtures(steps=2)  # a checkpoint at step 2


# --- class 1 (item 4): one trainer per run directory ---

HOLDER = ("import sys, time\nfrom apa_fast.train.checkpoint import run_dir_lock\n"
          "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n")


def test_a_second_trainer_is_refused_naming_the_directory_and_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env())
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(CheckpointError, match=rf"^{out} is in use by another apa-train process \(pid "
                                                  rf"{holder.pid}, which holds {out / '.lock'}\)"):
            train(small(out, max_steps=1))
        for flags in ([], ["--resume"], ["--overwrite"]):  # --overwrite must not delete a live run's files
            err = one_line_exit_2(capsys, ["--output-dir", str(out), "--max-steps", "1", *flags, *SETS])
            assert f"pid {holder.pid}" in err and str(out) in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()  # a holder killed outright (a crash) leaves nothing stuck
        holder.wait()
    assert [row["step"] for row in train(small(out, max_steps=1))] == [1]
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"


def test_the_lock_is_held_for_the_run_and_released_after_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999\n")  # what a killed run leaves: a stale pid, no lock
    seen = []

    def step_and_try(*args, **kwargs):  # a second trainer during the run's step
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"), run_dir_lock(out):
            pass
        seen.append(True)
        return real(*args, **kwargs)

    real = trainer.train_on_rollout
    monkeypatch.setattr(trainer, "train_on_rollout", step_and_try)
    train(small(out, max_steps=1))
    assert seen == [True]
    with run_dir_lock(out):  # released when the run ended
        pass
    with pytest.raises(CheckpointError), run_dir_lock(out), run_dir_lock(out):  # even within one process
        pass


def test_a_second_sweep_of_the_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    with run_dir_lock(out):
        with pytest.raises(SystemExit) as info:
            cli.main(["frontier", "--output-dir", str(out), "--grid", "apa:apa_lam=1", "--seeds", "1", *SETS])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and f"pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no point folder written


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "unwritable"])
def test_an_output_directory_that_cannot_be_made_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = {"under_a_file": tmp_path / "file" / "run", "a_file": tmp_path / "file",
           "unwritable": Path("/sys/apa_fast_test/run")}[where]
    err = one_line_exit_2(capsys, ["--output-dir", str(out), "--max-steps", "1", *SETS])
    assert err.startswith(f"apa-train: error: output_dir {out}")


# --- class 2 (item 5): the first Ctrl-C stops a frontier of several jobs, and its workers with it ---

def children(pid):
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def interrupt_sweep(out, grid, when, how, max_steps=200):
    """Start ``apa-train frontier --jobs 2`` on ``grid``, SIGINT it once ``when`` holds (to its process, to its
    process group as a terminal does, or twice), and return ``(exit code, stdout, stderr, worker pids)``."""
    command = [sys.executable, "-m", "apa_fast.train", "frontier", "--output-dir", str(out), *grid, "--seeds", "1",
               "--max-steps", str(max_steps), "--jobs", "2", *SETS, "--set", "save_every=1"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(), start_new_session=True)
    try:
        until(lambda: len(children(sweep.pid)) == 2, 120, "two workers")
        workers = children(sweep.pid)
        until(when, 180, "the moment to interrupt")
        for _ in range(2 if how == "twice" else 1):
            if how == "group":
                os.killpg(sweep.pid, signal.SIGINT)
            else:
                os.kill(sweep.pid, signal.SIGINT)
            time.sleep(0.2)
        stdout, stderr = sweep.communicate(timeout=60)  # a hang fails here
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    return sweep.returncode, stdout, stderr, workers


@pytest.mark.parametrize("how", ["process", "group", "twice"])
def test_ctrl_c_while_the_workers_start(tmp_path, how):
    out = tmp_path / "sweep"
    code, stdout, stderr, workers = interrupt_sweep(out, ["--grid", "apa:apa_lam=0.1,1"], lambda: True, how)
    assert code == 130, stderr
    assert stderr.strip().splitlines() == [f"apa-train frontier: interrupted: 0 of 2 points finished, their results "
                                           f"in {out}; run the same command to resume the others"]
    assert all(gone(pid) for pid in workers)
    for point in out.glob("apa_*"):
        with run_dir_lock(point):  # no worker holds a point's run directory any more
            pass


def test_ctrl_c_while_training_keeps_the_finished_point_and_leaves_the_others_resumable(tmp_path, finished_run):
    out = tmp_path / "sweep"
    kept = out / "apa_apa_lam=0.3_seed0"  # a point that finished before: a finished run, marked at step 50
    shutil.copytree(finished_run, kept)
    state = kept / "checkpoints" / "step_000002" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 50}))
    logs = [out / "apa_apa_lam=0.1_seed0" / "train.log", out / "apa_apa_lam=1_seed0" / "train.log"]

    def both_saved_a_step():
        return all((log.parent / "checkpoints" / "latest").is_file() for log in logs)

    code, stdout, stderr, workers = interrupt_sweep(out, ["--grid", "apa:apa_lam=0.1,0.3,1"], both_saved_a_step,
                                                    "twice", max_steps=50)
    assert code == 130, stderr
    assert re.fullmatch(r"apa-train frontier: interrupted: 1 of 3 points finished, .*\n", stderr), stderr
    assert [json.loads(line)["value"] for line in (out / "frontier.jsonl").read_text().splitlines()] == [0.3]
    assert all(gone(pid) for pid in workers)
    for log in logs:  # each stopped point has a checkpoint to resume from, and no worker holds it
        assert latest_checkpoint(log.parent) is not None
        with run_dir_lock(log.parent):
            pass


# --- class 3 (item 7): resume refuses a changed config, naming the fields ---

@pytest.mark.parametrize(("flags", "fields"), [
    (["--algo", "ppo"], ["algo='apa' (now 'ppo')"]),
    (["--set", "tiny_width=64"], ["tiny_width=32 (now 64)"]),
    (["--set", "lr=0.01", "--seed", "3"], ["seed=0 (now 3)", "lr=0.001 (now 0.01)"]),
    (["--set", "stop=['Human:']"], ["stop=[] (now ['Human:'])"]),
])
def test_resume_with_another_config_is_refused_naming_the_fields(run, capsys, flags, fields):
    argv = ["--output-dir", str(run), "--resume", "--max-steps", "3", *SETS]
    err = one_line_exit_2(capsys, [*argv, *flags])
    assert err.startswith(f"apa-train: error: {run / 'checkpoints' / 'step_000002' / 'trainer_state.json'}: the "
                          "run was made with ")
    assert all(field in err for field in fields) and "--overwrite" in err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_fields_that_may_change_on_resume_do(run):
    rows = train(small(run, max_steps=3, save_every=1, keep_checkpoints=3, loss_backend="torch"), resume=True)
    assert [r["step"] for r in rows] == [3]


def test_a_field_the_saved_config_lacks_is_not_compared(run):
    """A checkpoint written before a field existed resumes under the field's current value."""
    path = run / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["config"]["awr_max_weight"]
    path.write_text(json.dumps(state))
    assert [r["step"] for r in train(small(run, max_steps=3, awr_max_weight=5.0), resume=True)] == [3]


@pytest.mark.parametrize(("field", "value", "file"), [("tiny_width", 64, "policy/model.safetensors"),
                                                      ("tiny_vocab", 400, "policy/model.safetensors")])
def test_weights_that_do_not_fit_are_one_line_naming_the_file(run, capsys, field, value, file):
    """Saved settings and weights that disagree (a hand-edited trainer_state.json): the weights' file is named."""
    path = run / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["config"][field] = value
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"^{run / 'checkpoints' / 'step_000002' / file}: \d+ tensor\(s\) do "
                                              "not fit the model, e.g. "):
        train(small(run, max_steps=3, **{field: value}), resume=True)
    err = one_line_exit_2(capsys, ["--output-dir", str(run), "--resume", "--max-steps", "3", *SETS,
                                   "--set", f"{field}={value}"])
    assert file in err


# --- class 4 (item 11): what the config names is checked before DeepSpeed starts ---

@pytest.fixture
def no_deepspeed(monkeypatch):
    def refuse():
        raise AssertionError("DeepSpeed was started")

    monkeypatch.setattr(trainer, "setup_distributed", refuse)


@pytest.mark.parametrize(("sets", "field", "reason"), [
    (["policy=/nonexistent/model"], "policy", "does not exist"),
    (["critic=/nonexistent/critic"], "critic", "does not exist"),
    (["tokenizer=/no/such/tokenizer"], "tokenizer", "does not exist"),
    (["policy={tmp}/guards_broken_reward.py"], "policy", "is not a directory"),
    (["policy={tmp}"], "policy", "has no config.json"),
    (["reward={tmp}"], "reward", "has no config.json"),
    (["reward=nosuch.module:fn"], "reward", r"cannot import nosuch.module \(ModuleNotFoundError"),
    (["reward=apa_fast.train.rewards:nosuch"], "reward", "apa_fast.train.rewards has no attribute 'nosuch'"),
    (["reward=apa_fast.train.rewards:CHEERFUL"], "reward", "CHEERFUL is a tuple, not a function"),
    (["reward=guards_broken_reward:fn"], "reward", r"cannot import guards_broken_reward \(ZeroDivisionError"),
    (["reward=/no/classifier"], "reward", "does not exist \\(expected a package.module:function, "),
    (["dataset=/no/prompts.jsonl"], "dataset", "no such file /no/prompts.jsonl"),
    ([f"dataset={Path(frontier.__file__).parent / 'data' / 'hh_tiny.jsonl'}, /no/b.json"], "dataset",
     "no such file /no/b.json"),
    (["dataset=/no/such/dataset/dir"], "dataset", "does not exist"),
    (["deepspeed_config=/no/ds.json"], "deepspeed_config", "cannot read it as JSON"),
])
def test_bad_sources_are_one_line_before_deepspeed(tmp_path, capsys, monkeypatch, no_deepspeed, sets, field, reason):
    (tmp_path / "guards_broken_reward.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    sets = [s.format(tmp=tmp_path) for s in sets]
    err = one_line_exit_2(capsys, ["--output-dir", str(out), *(a for s in sets for a in ("--set", s))])
    assert re.search(rf"{field}.*{reason}", err), err
    assert not out.exists()
    with pytest.raises(SystemExit) as info:  # the sweep checks them once, before any point runs
        cli.main(["frontier", "--output-dir", str(tmp_path / "sweep"), "--grid", "apa:apa_lam=1",
                  *(a for s in sets for a in ("--set", s))])
    assert info.value.code == 2 and re.search(rf"{field}.*{reason}", capsys.readouterr().err)
    assert not (tmp_path / "sweep").exists()


def test_hub_names_and_good_local_sources_pass(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    check_sources(TrainConfig(policy="EleutherAI/gpt-j-6b", tokenizer="gpt2", critic=str(model),
                              reward=str(model), dataset="Anthropic/hh-rlhf"))
    check_sources(TrainConfig(reward=lambda prompts, responses: [0.0] * len(responses), dataset=str(tmp_path)))
    with pytest.raises(ConfigError, match="'tokenizer': .* is not a directory"):
        check_sources(TrainConfig(tokenizer=str(model / "config.json")))


# --- class 5 (item 12): frontier grids ---

@pytest.mark.parametrize(("spec", "expected"), [
    ("apa:ppo_epochs=1", ("apa", "ppo_epochs", [1])),  # every algorithm runs ppo_epochs passes
    ("awr:ppo_epochs=1,2", ("awr", "ppo_epochs", [1, 2])),
    ("ppo:minibatch_size=4,8", ("ppo", "minibatch_size", [4, 8])),
    ("apa:apa_lam=0.1,0.1000001", ("apa", "apa_lam", [0.1, 0.1000001])),
])
def test_shared_fields_and_close_values_are_swept(spec, expected):
    assert parse_grid(spec) == expected


@pytest.mark.parametrize(("spec", "reason"), [
    ("apa:awr_max_weight=5", "awr_max_weight is a parameter of awr"),
    ("awr:ppo_clip_eps=0.1", "ppo_clip_eps is a parameter of ppo"),
    ("ppo:apa_lam=0.1", "apa_lam is a parameter of apa"),
    ("apa:max_steps=2,3", "max_steps is the same for every run of a sweep: give it with --max-steps"),
    ("awr:max_steps=2", "max_steps is the same for every run"),
    ("apa:save_every=1,2", "save_every does not change what a run learns"),
    ("apa:keep_checkpoints=1", "keep_checkpoints does not change what a run learns"),
    ("apa:apa_lam=0.1,0.1000000000000000001", "value 0.1 appears twice"),  # the same float
])
def test_grids_that_cannot_be_swept_are_refused(spec, reason):
    with pytest.raises(GridError, match=rf"^--grid {re.escape(repr(spec))}: {reason}"):
        parse_grid(spec)


def test_point_folders_are_exact_and_keep_the_names_of_earlier_sweeps(tmp_path):
    specs = ["apa:apa_lam=0.1,0.1000001,1,1e-5,3e-2", "ppo:ppo_kl_horizon=1234567", "awr:awr_lam=1.0"]
    names = [p.name for p, _ in plan(TrainConfig(), specs, 1, tmp_path)]
    assert names == ["apa_apa_lam=0.1_seed0", "apa_apa_lam=0.1000001_seed0", "apa_apa_lam=1_seed0",
                     "apa_apa_lam=1e-05_seed0", "apa_apa_lam=0.03_seed0", "ppo_ppo_kl_horizon=1234567_seed0",
                     "awr_awr_lam=1_seed0"]
    points = plan(TrainConfig(), ["apa:apa_lam=0.1,0.1000001"], 1, tmp_path)
    assert [cfg.apa_lam for _, cfg in points] == [0.1, 0.1000001]
    assert len({p.label() for p, _ in points}) == 2
    with pytest.raises(GridError, match="apa apa_lam=1 seed 0 is already in another grid"):
        plan(TrainConfig(), ["apa:apa_lam=1", "apa:apa_lam=1.0"], 1, tmp_path)

"""Tiny trainer runs the trainer tests share: a config that takes a few seconds a step, its command-line form, and
a finished run that tests work on copies of."""

import shutil

import pytest

from apa_fast.train.config import TrainConfig

SMALL = dict(rollout_batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, max_prompt_tokens=32,
             save_every=2, tiny_width=32, tiny_heads=2, tiny_vocab=384)
SETS = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]


def small(run_dir, **fields) -> TrainConfig:
    return TrainConfig(**{**SMALL, "output_dir": str(run_dir), **fields})


def run_fixtures(steps: int):
    """``(finished_run, run)`` fixtures for a test module: one ``steps``-step run (checkpoints every 2 steps),
    trained once per module, and a copy of it for each test to change."""

    @pytest.fixture(scope="module")
    def finished_run(tmp_path_factory):
        from apa_fast.train.trainer import train

        run_dir = tmp_path_factory.mktemp("finished") / "run"
        train(small(run_dir, max_steps=steps))
        return run_dir

    @pytest.fixture
    def run(finished_run, tmp_path):
        copy = tmp_path / "run"
        shutil.copytree(finished_run, copy)
        return copy

    return finished_run, run

"""Step time and peak memory of the trainer with each advantage estimator, on the embedded tiny default (CPU).

    python -m benchmarks.train_estimators [--steps 6]

Each case trains in a fresh process (tensor allocations served by ``mmap``, as in `benchmarks/memory.py`) for
``--steps`` steps without evaluation; a step's peak is the resident set's high-water mark over its rollout and
update above the resident set before it (VmHWM, reset through ``/proc/self/clear_refs``); its time is wall
time and the process's CPU time (all threads: steadier than wall time on a machine shared with other work).
The table gives the medians over the steps after the first (the first step allocates the optimizer state and
thread pools), and the trainable parameters: the critic's trunk and value head are what group does without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.memory import REPO_ROOT, _status_kib, reset_peak_rss

CASES = {
    "gae (critic: a copy of the trunk)": {},
    "gae, critic_shares_trunk": {"critic_shares_trunk": True},
    "group grpo, 8 prompts x 4 (32 sequences)": {"advantage_estimator": "group", "rollout_batch_size": 8},
    "group grpo, 32 prompts x 4 (128 sequences)": {"advantage_estimator": "group"},
}


def measure(fields: dict, steps: int, out: str) -> list[dict]:
    """Train ``steps`` steps of the tiny default with ``fields``; per step ``{seconds, cpu_s, peak_mib, ...}``."""
    from apa_fast.train import trainer
    from apa_fast.train.config import TrainConfig

    records, real_rollout, real_update = [], trainer.make_rollout, trainer.train_on_rollout

    def rollout(*args, **kwargs):
        reset_peak_rss()
        records.append({"rss_kib": _status_kib("VmRSS"), "start": time.perf_counter(), "cpu": time.process_time()})
        return real_rollout(*args, **kwargs)

    def update(engine, *args, **kwargs):
        losses = real_update(engine, *args, **kwargs)
        record = records[-1]
        record["seconds"] = time.perf_counter() - record.pop("start")
        record["cpu_s"] = time.process_time() - record.pop("cpu")
        record["peak_mib"] = (_status_kib("VmHWM") - record.pop("rss_kib")) / 1024
        record["trainable"] = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        return losses

    trainer.make_rollout, trainer.train_on_rollout = rollout, update
    trainer.train(TrainConfig(**fields, max_steps=steps, eval_every=0, save_every=10**6, output_dir=out),
                  overwrite=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's case
    args = parser.parse_args()
    if args.case is not None:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(measure(CASES[args.case], args.steps, out)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print("| estimator | trainable parameters | step: wall s | step: CPU s | peak memory of a step (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name in CASES:
        done = subprocess.run([sys.executable, "-m", "benchmarks.train_estimators", "--steps", str(args.steps),
                               "--case", name], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
        steps = json.loads(done.stdout.strip().splitlines()[-1])[1:]
        medians = [statistics.median(s[key] for s in steps) for key in ("seconds", "cpu_s", "peak_mib")]
        print(f"| {name} | {steps[0]['trainable']:,} | {medians[0]:.2f} | {medians[1]:.2f} | {medians[2]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()

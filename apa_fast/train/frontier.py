"""``apa-train frontier`` / ``python -m apa_fast.train.frontier``: the reward-KL frontier of APA, PPO and AWR.

Sweeps each algorithm's parameter (APA's lam, PPO's KL coefficient, AWR's lam) over a grid and seeds::

    apa-train frontier --output-dir runs/frontier --grid "apa:apa_lam=0.03,0.1,0.3,1" \\
        --grid "ppo:ppo_kl_coef=0.01,0.05,0.2" --grid "awr:awr_lam=1,3" --seeds 2 --max-steps 80

A grid may fix other fields for its runs, making a series of its own: ``--grid
"apa+advantage_estimator=group+rollout_batch_size=8:apa_lam=0.1,0.3"`` is APA without a critic, plotted beside
the plain ``apa`` grid's curve.

Every point (series, value, seed) is an ordinary run in its own folder of the output directory, with its
``config.yaml``: it resumes like any run (``apa-train --config D/<point>/config.yaml --resume``), and running the
command again skips the finished points and resumes the interrupted ones. The points run in worker processes
(``--jobs N`` of them, the CPU threads split between them), each run's output going to its ``train.log``.
The output directory gets ``frontier.jsonl`` (one record per run), ``frontier.md`` and ``frontier.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
import typing
from multiprocessing.connection import wait
from pathlib import Path

import yaml

from .config import (
    ALGOS,
    RESUME_MAY_CHANGE,
    ConfigError,
    TrainConfig,
    changed_fields,
    check_sources,
    config_dict,
    load_config,
    make_config,
)

# The swept part follows the last colon (a fixed setting's value may hold one: a reward's module:function).
GRID = re.compile(r"(?P<series>.*):(?P<parameter>[^=:]*)=(?P<values>[^:]*)")
COLORS = {"apa": "tab:blue", "ppo": "tab:orange", "awr": "tab:green"}
# The fields only one algorithm reads; every other field (ppo_epochs, lr, ...) changes the runs of all three.
ALGORITHM_FIELDS = {"apa": ("apa_lam",), "awr": ("awr_lam", "awr_max_weight"),
                    "ppo": ("ppo_clip_eps", "ppo_kl_coef", "ppo_adaptive_kl", "ppo_kl_target", "ppo_kl_horizon")}


class GridError(ValueError):
    """A ``--grid`` string (or a point's saved state) that cannot be swept; the message names it."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep: ``parameter = value`` for ``series`` with ``seed``. The series is the algorithm,
    then the grid's fixed settings: ``"apa"``, ``"apa+advantage_estimator=group+rollout_batch_size=8"``."""

    series: str
    parameter: str
    value: float
    seed: int

    @property
    def algorithm(self) -> str:
        return self.series.partition("+")[0]

    @property
    def name(self) -> str:
        return f"{self.series}_{self.parameter}={number(self.value)}_seed{self.seed}"

    def label(self) -> str:
        return f"{self.series} {self.parameter}={number(self.value)} seed {self.seed}"


def series_title(series: str) -> str:
    """How tables and legends name a series: ``"APA"``, ``"APA advantage_estimator=group, rollout_batch_size=8"``."""
    algorithm, _, settings = series.partition("+")
    return " ".join(filter(None, (algorithm.upper(), settings.replace("+", ", "))))


def setting(text: str) -> tuple[str, typing.Any]:
    """``"rollout_batch_size=8"`` -> ``("rollout_batch_size", 8)``: a grid's fixed setting, its value read as YAML
    (as ``--set`` reads it). Raises ValueError for a malformed one."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ValueError(f"fixed setting {text!r} is not KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"fixed setting {text!r}: the value is not valid YAML") from None


def number(value: float) -> str:
    """``value`` written so that it reads back exactly: ``:g`` where that is exact (the folder names of earlier
    sweeps), else ``repr`` (0.1000001, not 0.1): distinct values get distinct point folders and labels."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def parse_grid(spec: str) -> tuple[str, str, list[float]]:
    """``"apa:apa_lam=0.03,0.1"`` -> ``("apa", "apa_lam", [0.03, 0.1])``, and with fixed settings
    ``"apa + samples_per_prompt=8:apa_lam=0.1"`` -> ``("apa+samples_per_prompt=8", "apa_lam", [0.1])`` (the series,
    without the spaces around its parts: it names the points' folders); errors name the string."""
    def error(reason: str) -> GridError:
        return GridError(f"--grid {spec!r}: {reason}")

    match = GRID.fullmatch(spec.strip())
    if not match:
        raise error("expected ALGORITHM:FIELD=V1,V2,... (e.g. apa:apa_lam=0.1,0.3,1), or with fixed settings "
                    "ALGORITHM+KEY=VALUE+...:FIELD=V1,V2,...")
    algorithm, *fixed = [part.strip() for part in match["series"].split("+")]
    parameter = match["parameter"].strip()
    if algorithm not in ALGOS:
        raise error(f"algorithm {algorithm!r} is not one of {ALGOS}")
    hints, keys, series = typing.get_type_hints(TrainConfig), [], [algorithm]
    for text in fixed:
        try:
            key, value = setting(text)
        except ValueError as exc:
            raise error(str(exc)) from None
        if key not in hints:
            raise error(f"fixed setting {key!r} is not a config field")
        given = {"algo": "by the grid's algorithm", "seed": "by --seeds", "max_steps": "by --max-steps",
                 parameter: "as the swept field", **dict.fromkeys(keys, "twice")}
        if key in given:
            raise error(f"fixed setting {key} is given {given[key]}")
        if key in RESUME_MAY_CHANGE:
            raise error(f"fixed setting {key} does not change what a run learns: give it to every run with --set")
        if isinstance(value, (dict, list)) or "/" in str(value):
            raise error(f"fixed setting {text!r}: the value names the points' folders: a scalar without '/'")
        keys.append(key)
        series.append(f"{key}={text.partition('=')[2].strip()}")
    numeric = sorted(name for name, hint in hints.items() if hint in (int, float) and name != "seed")
    if parameter not in numeric:
        raise error(f"{parameter!r} is not a numeric config field to sweep (seeds: --seeds); one of {numeric}")
    if parameter == "max_steps":
        raise error("max_steps is the same for every run of a sweep: give it with --max-steps")
    if parameter in RESUME_MAY_CHANGE:
        raise error(f"{parameter} does not change what a run learns: give it to every run with --set")
    for field in (parameter, *keys):
        other = [a for a, owned in ALGORITHM_FIELDS.items() if a != algorithm and field in owned]
        if other:
            raise error(f"{field} is a parameter of {other[0]}, it does not change {algorithm}")
    values = []
    for raw in match["values"].split(","):
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise error(f"{raw.strip()!r} is not a number")
        if value in values:
            raise error(f"value {number(value)} appears twice")
        values.append(value)
    return "+".join(series), parameter, values


def plan(base: TrainConfig, specs: list[str], seeds: int, out: Path) -> list[tuple[Point, TrainConfig]]:
    """Every point of the grids and its run's config (validated), in grid order, seeds innermost."""
    points: dict[str, tuple[Point, TrainConfig]] = {}
    for spec in specs:
        series, parameter, values = parse_grid(spec)
        algorithm, *fixed = series.split("+")
        for value in values:
            for seed in range(base.seed, base.seed + seeds):
                point = Point(series, parameter, value, seed)
                if point.name in points:
                    raise GridError(f"--grid {spec!r}: {point.label()} is already in another grid")
                try:
                    cfg = dataclasses.replace(base, algo=algorithm, seed=seed, output_dir=str(out / point.name),
                                              **dict(map(setting, fixed)), **{parameter: value})
                except ConfigError as exc:
                    raise GridError(f"--grid {spec!r}: {exc}") from None
                points[point.name] = point, cfg
    return list(points.values())


def check_saved_config(cfg: TrainConfig) -> None:
    """Write the point's ``config.yaml``, after checking that the one there (a previous sweep's) has the same
    values: resuming a run under another config would mix two experiments in one curve."""
    path = Path(cfg.output_dir) / "config.yaml"
    wanted = config_dict(cfg)
    if path.is_file():
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise GridError(f"{path}: cannot be read ({type(exc).__name__}); delete the point's folder to redo "
                            "it") from exc
        if not isinstance(saved, dict):
            raise GridError(f"{path}: is not a mapping of config fields; delete the point's folder to redo it")
        # As on resume: max_steps may grow (the runs extend), output_dir is the folder however it is spelled, ...
        changed = sorted(changed_fields(saved, cfg))
        if changed:
            raise GridError(f"{path}: this point ran with other values of {changed}; use another --output-dir, "
                            "or delete the point's folder to redo it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(wanted, sort_keys=False))
    os.replace(tmp, path)


def finished(cfg: TrainConfig) -> bool:
    """Whether the point's run has a complete checkpoint at ``max_steps`` or later."""
    from .checkpoint import CheckpointError, latest_checkpoint, read_trainer_state

    try:
        path = latest_checkpoint(cfg.output_dir)
        return path is not None and read_trainer_state(path)["step"] >= cfg.max_steps
    except CheckpointError:  # a broken run directory: the worker's resume reports it
        return False


# --- worker processes ---

DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER = "import sys; from apa_fast.train.frontier import worker_main; worker_main(sys.argv[1])"


def worker_main(job: str) -> None:
    """A worker process: run the point of ``job`` (JSON: its config values and the launcher) and write the
    `run_point` result as JSON on stdout, the only thing the worker writes there."""
    values, launcher = json.loads(job)
    sys.stdout.write(json.dumps(run_point(values, launcher)))


class Worker:
    """The process running one point: a fresh interpreter (`worker_main`) with its share of the CPU threads.

    It trains as a world of one process: a rendezvous inherited from the sweep (one that trained in-process, or
    a launcher's) would collide with the sweep's port. It leads a session of its own, with what it launches, so
    that a terminal's Ctrl-C reaches the sweep alone, which then stops each worker's whole group (`stop_workers`).
    """

    def __init__(self, point: Point, cfg: TrainConfig, launcher: str | None, threads: int):
        self.point, self.cfg = point, cfg
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        package_root = str(Path(__file__).resolve().parents[2])  # where the sweep imported apa_fast from
        env.update(APA_TRAIN_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH")))))
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps([config_dict(cfg), launcher])],
                                        stdout=subprocess.PIPE, env=env, start_new_session=True)

    def result(self) -> tuple[str | None, float]:
        """``(error, seconds)`` as `run_point` returns them, once the worker has written them (or died)."""
        out = self.process.stdout.read()
        code = self.process.wait()
        self.process.stdout.close()
        try:
            error, seconds = json.loads(out)
        except ValueError:
            return f"its worker process ended with exit code {code} and no result", 0.0
        return error, seconds

    def alive(self) -> bool:
        """Whether the worker or anything in its process group still runs (the worker is reaped once ended)."""
        self.process.poll()
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_workers(workers: list[Worker], grace: float = 10.0) -> None:
    """SIGTERM to each worker's process group (the worker and what it launched), then SIGKILL to whatever is left
    after ``grace`` seconds. A point stopped this way resumes from its last checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, sig)
        deadline = time.monotonic() + grace
        while any([w.alive() for w in workers]) and time.monotonic() < deadline:
            time.sleep(0.05)
    for worker in workers:
        worker.process.stdout.close()


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors, so tqdm and C code follow) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def run_point(values: dict, launcher: str | None) -> tuple[str | None, float]:
    """Run (or resume) one point: ``(error, seconds)``, error None on success, else in one line (the details are
    in the point's train.log). Errors are returned, not raised, so that any of them crosses processes.

    Without ``launcher`` the run trains in this worker process; with it, the worker runs ``launcher --config
    <point>/config.yaml --resume`` (e.g. ``deepspeed --num_gpus 8 --module apa_fast.train``) and waits.
    """
    cfg = make_config(values)
    run_dir = Path(cfg.output_dir)
    start = time.perf_counter()
    with _output_to(run_dir / "train.log"):
        from .trainer import train  # inside: DeepSpeed's import-time messages go to the log too

        if launcher:
            command = [*shlex.split(launcher), "--config", str(run_dir / "config.yaml"), "--resume"]
            code = subprocess.run(command, env=os.environ).returncode
            error = None if code == 0 else f"{shlex.join(command)} exited with {code}"
            return error, time.perf_counter() - start
        try:
            train(cfg, resume=True)
        except Exception as exc:  # reported on the sweep's progress line; the other points go on
            traceback.print_exc()
            return f"{type(exc).__name__}: {exc}", time.perf_counter() - start
    return None, time.perf_counter() - start


# --- results ---

def point_record(point: Point, cfg: TrainConfig) -> dict:
    """The run's record: reward and KL are means over the last quarter of its steps (std over those steps), and
    the held-out figures (`heldout_figures`) when the run evaluated. ``series`` is the algorithm and the grid's
    fixed settings (`Point`): records of one series and parameter make one curve."""
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    last = rows[-max(len(rows) // 4, 1):]
    reward, kl = [r["reward_mean"] for r in last], [r["kl"] for r in last]
    return {"algorithm": point.algorithm, "series": point.series, "parameter": point.parameter,
            "value": point.value, "seed": point.seed,
            "steps": rows[-1]["step"], "reward": statistics.fmean(reward), "reward_std": statistics.pstdev(reward),
            "kl": statistics.fmean(kl), "kl_std": statistics.pstdev(kl),
            "wall_s": sum(r["gen_s"] + r["update_s"] for r in rows),
            **heldout_figures(Path(cfg.output_dir), rows[-1]["step"])}


def heldout_figures(run_dir: Path, steps: int) -> dict:
    """The run's held-out evaluations (its eval.jsonl; {} without one), averaged over those in the last quarter
    of its ``steps`` (at least the last): ``heldout_reward`` is the evaluator's (``evaluator`` names it: the
    training reward's when the run had no separate one), ``heldout_train_reward`` the training reward's; and
    ``heldout_curve``, ``[samples_seen, heldout reward]`` of every evaluation (the sample-efficiency curve:
    responses sampled and scored, prompts x samples_per_prompt, so that GAE's one response per prompt and the
    group estimator's several compare at equal samples; ``prompts_seen`` in an eval.jsonl without the field)."""
    path = run_dir / "eval.jsonl"
    evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not evals:
        return {}
    judge = "eval_reward" if "eval_reward" in evals[0] else "reward"
    last = [e for e in evals if e["step"] > steps - max(steps // 4, 1)] or evals[-1:]

    def mean(name: str) -> float:
        return statistics.fmean(e[name] for e in last)

    return {"evaluator": judge, "heldout_reward": mean(judge), "heldout_train_reward": mean("reward"),
            "heldout_kl": mean("kl"), "heldout_entropy": mean("entropy"), "heldout_distinct_2": mean("distinct_2"),
            "heldout_curve": [[e.get("samples_seen", e["prompts_seen"]), e[judge]] for e in evals]}


def efficiency_points(records: list[dict]) -> dict[tuple[str, str], float]:
    """The value of each curve compared in the sample-efficiency plot: the one whose held-out KL (mean over
    seeds) is nearest the median held-out KL of all values, so that the curves compare at about equal KL."""
    by_curve = {key: [(value, statistics.fmean(r["heldout_kl"] for r in runs)) for value, runs in by_value]
                for key, by_value in curves([r for r in records if "heldout_kl" in r]).items()}
    if not by_curve:
        return {}
    budget = statistics.median(kl for values in by_curve.values() for _, kl in values)
    return {key: min(values, key=lambda v: abs(v[1] - budget))[0] for key, values in by_curve.items()}


def curves(records: list[dict]) -> dict[tuple[str, str], list[tuple[float, list[dict]]]]:
    """Records grouped by (series, parameter), then by value (ascending): one curve per group."""
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for record in records:
        groups.setdefault(curve_key(record), {}).setdefault(record["value"], []).append(record)
    return {key: sorted(by_value.items()) for key, by_value in groups.items()}


def curve_key(record: dict) -> tuple[str, str]:
    """``(series, parameter)`` of a record (the series is the algorithm in records written without one)."""
    return record.get("series", record["algorithm"]), record["parameter"]


def _curve_runs(records: list[dict], key: tuple[str, str], value: float) -> list[dict]:
    return [r for r in records if curve_key(r) == key and r["value"] == value]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def frontier_markdown(records: list[dict], command: str) -> str:
    """``frontier.md``: one table per algorithm, a row per parameter value, the seeds side by side; with held-out
    evaluations, their columns first and the sample-efficiency table."""
    heldout = all("heldout_reward" in r for r in records)
    lines = ["# Reward-KL frontier", "", f"`{command}`", "",
             "Reward and KL (to pi_init, nats per sequence) are means over the last quarter of each run's steps "
             "(training: its rollouts, scored by the training reward"
             + ("; held-out: its evaluations in that quarter, scored by the evaluator" if heldout else "")
             + "); the seeds are averaged, then listed in seed order.", ""]
    columns = [("heldout_reward", "held-out reward", ".3f"), ("heldout_kl", "held-out KL", ".2f")] if heldout else []
    columns += [("reward", "training reward", ".3f"), ("kl", "training KL", ".2f")]
    for (series, parameter), by_value in curves(records).items():
        lines += [f"## {series_title(series)}: {parameter}", "",
                  f"| {parameter} | " + " | ".join(title for _, title, _ in columns) + " | "
                  + " | ".join(f"{title} per seed" for _, title, _ in columns) + " |",
                  "|---:|" + "---:|" * len(columns) + "---|" * len(columns)]
        for value, runs in by_value:
            runs = sorted(runs, key=lambda r: r["seed"])
            means = [format(statistics.fmean(r[key] for r in runs), spec) for key, _, spec in columns]
            seeds = [", ".join(format(r[key], spec) for r in runs) for key, _, spec in columns]
            lines.append(f"| {number(value)} | " + " | ".join(means + seeds) + " |")
        lines.append("")
    chosen = efficiency_points(records) if heldout else {}
    if chosen:
        lines += ["## Sample efficiency", "",
                  "Held-out reward (mean over seeds) after each number of responses sampled in training (prompts x "
                  "samples_per_prompt), at each curve's value whose "
                  "held-out KL is nearest the median of all values' (`efficiency.png`).", ""]
        for (series, parameter), value in chosen.items():
            points = _mean_curve(_curve_runs(records, (series, parameter), value))
            lines.append(f"- {series_title(series)} {parameter}={number(value)}: "
                         + ", ".join(f"{seen:g}: {reward:.3f}" for seen, reward, _, _ in points))
        lines.append("")
    return "\n".join(lines)


def _mean_curve(runs: list[dict]) -> list[tuple[float, float, float, float]]:
    """``(samples_seen, mean, min, max)`` over the seeds' held-out curves, at the evaluations they all have."""
    by_seen: dict[float, list[float]] = {}
    for run in runs:
        for seen, reward in run["heldout_curve"]:
            by_seen.setdefault(seen, []).append(reward)
    return [(seen, statistics.fmean(v), min(v), max(v)) for seen, v in sorted(by_seen.items()) if len(v) == len(runs)]


def plot_frontier(records: list[dict], path: Path, title: str) -> None:
    """``frontier.png``: reward against KL, a curve per algorithm through its values (labelled), the marker at
    the seeds' mean and the error bars spanning the seeds' minimum to maximum on both axes. With held-out
    evaluations: the evaluator's reward against the held-out KL on the left, the training figures on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("heldout_kl", "heldout_reward", "held-out: evaluator's reward")] if all(
        "heldout_reward" in r for r in records) else []
    panels.append(("kl", "reward", "training rollouts: training reward"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    for ax, (x_key, y_key, name) in zip(axes[0], panels, strict=True):
        _frontier_panel(ax, records, x_key, y_key)
        ax.set_title(f"{name}\n{title}" if len(panels) > 1 else title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _frontier_panel(ax, records: list[dict], x_key: str, y_key: str) -> None:
    """One reward-KL panel of `plot_frontier`: ``y_key`` against ``x_key`` of the records."""
    import matplotlib.ticker

    for index, ((series, parameter), by_value) in enumerate(curves(records).items()):
        color = COLORS.get(series.partition("+")[0])
        xs, ys, xerr, yerr = [], [], [[], []], [[], []]
        for value, runs in by_value:
            kl, reward = [r[x_key] for r in runs], [r[y_key] for r in runs]
            xs.append(statistics.fmean(kl))
            ys.append(statistics.fmean(reward))
            xerr[0].append(xs[-1] - min(kl))
            xerr[1].append(max(kl) - xs[-1])
            yerr[0].append(ys[-1] - min(reward))
            yerr[1].append(max(reward) - ys[-1])
            ax.annotate(number(value), (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, -11), fontsize=8,
                        color=color)
        # Series of one algorithm share its colour: a series with fixed settings gets square markers.
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="s" if "+" in series else "o", capsize=3, color=color,
                    linestyle=("-", "--", ":")[index % 3], label=f"{series_title(series)} ({parameter})")
    # KL spans decades: a log axis, symmetric-log when an estimate near 0 came out negative (it is a sample mean).
    if min(r[x_key] for r in records) > 0:
        ax.set_xscale("log")
        # Plain numbers at the minor ticks matplotlib labels (on an axis of few decades), not 3x10^0.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
    else:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("KL to pi_init (nats per sequence)   [up and to the left is better]")
    ax.set_ylabel("reward")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)  # where a frontier has no points: more reward for less KL


def plot_efficiency(records: list[dict], path: Path, title: str) -> None:
    """``efficiency.png``: the held-out reward against responses sampled, a line per curve at its
    `efficiency_points` value (mean over seeds, the band spanning their minimum to maximum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for index, ((series, parameter), value) in enumerate(efficiency_points(records).items()):
        runs = _curve_runs(records, (series, parameter), value)
        color = COLORS.get(series.partition("+")[0])
        seen, mean, low, high = zip(*_mean_curve(runs), strict=True)
        ax.plot(seen, mean, marker="s" if "+" in series else "o", color=color, linestyle=("-", "--", ":")[index % 3],
                label=f"{series_title(series)} {parameter}={number(value)} "
                      f"(held-out KL {statistics.fmean(r['heldout_kl'] for r in runs):.2g})")
        ax.fill_between(seen, low, high, color=color, alpha=0.15)
    ax.set_xlabel("responses sampled in training (prompts x samples_per_prompt)")
    ax.set_ylabel(f"held-out reward ({next(r['evaluator'] for r in records if 'evaluator' in r)})")
    ax.set_title(f"Sample efficiency at about equal held-out KL\n{title}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(out: Path, records: list[dict], command: str, title: str) -> None:
    write_atomic(out / "frontier.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_atomic(out / "frontier.md", frontier_markdown(records, command))
    from .trainer import plotting_available

    if plotting_available():
        plot_frontier(records, out / "frontier.png", title)
        if efficiency_points(records):
            plot_efficiency(records, out / "efficiency.png", title)


# --- the command ---

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="apa-train frontier",
        description="Sweep APA's lam, PPO's KL coefficient and AWR's lam (one run per value and seed) and plot "
                    "the reward-KL frontier. Without --config: the embedded tiny default.")
    parser.add_argument("--config", help="YAML file of TrainConfig fields shared by every run")
    parser.add_argument("--output-dir", required=True, help="sweep directory: a folder per point, frontier.*")
    parser.add_argument("--grid", action="append", required=True, metavar="ALGO[+KEY=VALUE...]:FIELD=V1,V2,...",
                        help='e.g. "apa:apa_lam=0.03,0.1,0.3,1" "ppo:ppo_kl_coef=0.01,0.05" "awr:awr_lam=1,3"')
    parser.add_argument("--seeds", type=int, default=2, help="runs per value, seeds seed..seed+N-1 (default 2)")
    parser.add_argument("--max-steps", type=int, help="steps of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (CPU threads split between them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of every run (YAML value)")
    parser.add_argument("--launcher", metavar="COMMAND",
                        help='run each point as COMMAND --config <point>/config.yaml --resume, e.g. "deepspeed '
                             '--num_gpus 8 --module apa_fast.train" (default: in a worker process, CPU or 1 GPU)')
    args = parser.parse_args(argv)
    for name in ("seeds", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def sweep(points: list[tuple[Point, TrainConfig]], out: Path, jobs: int, command: str,
          launcher: str | None = None) -> int:
    """Run the unfinished points, a progress line each; write the outputs as results come. Returns failures.

    Ctrl-C (SIGINT) stops every worker with what it launched (a point resumes from its last checkpoint), writes
    the outputs of the finished points and raises KeyboardInterrupt, leaving SIGINT ignored (a second Ctrl-C
    must not cut short the exit).
    """
    done = {p.name: point_record(p, cfg) for p, cfg in points if finished(cfg)}
    todo = [(p, cfg) for p, cfg in points if p.name not in done]
    base = points[0][1]
    title = (f"Reward-KL frontier: {base.max_steps} steps per run, {len({p.seed for p, _ in points})} seeds; "
             "last-quarter means, bars: seed range")
    width = len(str(len(points)))
    count = 0

    def report(point: Point, text: str) -> None:
        nonlocal count
        count += 1
        print(f"[{count:{width}d}/{len(points)}] {point.label()}: {text}", flush=True)

    def outputs() -> None:
        write_outputs(out, [done[p.name] for p, _ in points if p.name in done], command, title)

    for point, _ in points:
        if point.name in done:
            record = done[point.name]
            report(point, f"finished earlier: reward {record['reward']:.3f}, kl {record['kl']:.2f}")
    failures = 0
    if todo:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        waiting, running = list(todo), {}  # running: stdout pipe -> Worker
        # Ctrl-C only wakes the loop below (a handler that raises could strike anywhere, between a worker's start
        # and its registration say): the loop then stops the workers. A second Ctrl-C changes nothing.
        wake_r, wake_w = os.pipe()
        previous = signal.signal(signal.SIGINT, lambda *_: os.write(wake_w, b"\0"))
        interrupted = False
        try:
            while (waiting or running) and not interrupted:
                while waiting and len(running) < jobs:
                    worker = Worker(*waiting.pop(0), launcher, threads)
                    running[worker.process.stdout] = worker
                ready = wait([*running, wake_r])
                interrupted = wake_r in ready
                for pipe in ready:
                    if pipe == wake_r:
                        continue
                    worker = running.pop(pipe)
                    error, seconds = worker.result()
                    point, cfg = worker.point, worker.cfg
                    if error is None:
                        done[point.name] = record = point_record(point, cfg)
                        report(point, f"reward {record['reward']:.3f}, kl {record['kl']:.2f} "
                                      f"({record['steps']} steps, {seconds:.0f} s)")
                        outputs()
                    else:
                        failures += 1
                        report(point, f"FAILED: {error} (log: {Path(cfg.output_dir) / 'train.log'})")
        finally:
            stop_workers(list(running.values()))  # none unless interrupted (or this loop failed)
            # Interrupted: further Ctrl-Cs stay ignored, so that none cuts short the caller's clean-up and exit.
            signal.signal(signal.SIGINT, signal.SIG_IGN if interrupted else previous)
            os.close(wake_r)
            os.close(wake_w)
        if interrupted:
            if done:
                outputs()
            raise KeyboardInterrupt
    if done:
        outputs()
    return failures


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from .checkpoint import CheckpointError, run_dir_lock

    args = parse_args(argv)
    out = Path(args.output_dir)
    with contextlib.ExitStack() as hold:
        try:
            base = load_config(args.config, args.set,
                               **({} if args.max_steps is None else {"max_steps": args.max_steps}))
            points = plan(base, args.grid, args.seeds, out)
            for cfg in {point.series: cfg for point, cfg in points}.values():  # a series' settings may name some
                check_sources(cfg)
            hold.enter_context(run_dir_lock(out))  # a second sweep of the same directory is refused
            for _, cfg in points:
                check_saved_config(cfg)
        except (ConfigError, GridError, CheckpointError) as exc:
            print(f"apa-train frontier: error: {exc}", file=sys.stderr)
            sys.exit(2)
        started = time.perf_counter()
        try:
            failures = sweep(points, out, args.jobs, "apa-train frontier " + shlex.join(argv), args.launcher)
        except KeyboardInterrupt:
            kept = sum(finished(cfg) for _, cfg in points)
            print(f"apa-train frontier: interrupted: {kept} of {len(points)} points finished, their results in "
                  f"{out}; run the same command to resume the others", file=sys.stderr)
            sys.exit(130)
    print(f"apa-train frontier: {len(points)} points, {failures} failed, {time.perf_counter() - started:.0f} s; "
          f"{out / 'frontier.md'}, {out / 'frontier.png'}, {out / 'frontier.jsonl'}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""``apa-train`` / ``python -m apa_fast.train``: parse the command line into a TrainConfig and run it.

``apa-train frontier ...`` runs the reward-KL sweep instead (`apa_fast.train.frontier`).
"""

from __future__ import annotations

import argparse
import sys

from .config import ALGOS, ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="apa-train",
        description="Fine-tune a causal LM with APA (or the PPO / AWR baselines) on DeepSpeed. "
                    "Without --config: the embedded tiny default (random-init GPT-J, CPU, a few minutes). "
                    "`apa-train frontier --help`: the reward-KL sweep over lam / KL coefficients and seeds.",
    )
    parser.add_argument("--config", help="YAML file of TrainConfig fields")
    parser.add_argument("--output-dir", help="run directory: metrics.jsonl, curves.png, checkpoints/")
    parser.add_argument("--max-steps", type=int, help="the run's total number of steps (resumed runs included)")
    parser.add_argument("--algo", choices=ALGOS)
    parser.add_argument("--seed", type=int)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in the run dir (or the newest complete one)")
    start.add_argument("--overwrite", action="store_true",
                       help="start again in a run dir that holds a run (its checkpoints are deleted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (YAML value), e.g. --set lr=1e-4 --set stop='[\"Human:\"]'")
    # deepspeed's launcher appends --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def fail(exc: Exception, code: int) -> None:
    """Print ``apa-train: error: ...`` (one line, no traceback) and exit with ``code``."""
    print(f"apa-train: error: {exc}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["frontier"]:  # `apa-train frontier ...`: the reward-KL sweep (apa_fast.train.frontier)
        from .frontier import main as frontier

        return frontier(argv[1:])
    args = parse_args(argv)
    flags = {"output_dir": args.output_dir, "max_steps": args.max_steps, "algo": args.algo, "seed": args.seed}
    try:
        cfg = load_config(args.config, args.set, **{k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        fail(exc, 2)

    from .checkpoint import CheckpointError
    from .data import DataError
    from .trainer import train
    from .update import NonFiniteLossError

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    # Errors in what the user gave (config, data, run directory, checkpoint) exit 2 like argparse's.
    except (ConfigError, DataError, CheckpointError, FileExistsError) as exc:
        fail(exc, 2)
    except NonFiniteLossError as exc:
        fail(exc, 1)


if __name__ == "__main__":
    main()

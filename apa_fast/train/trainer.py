"""The training loop: each step samples a rollout, updates policy and critic on it, logs one line, checkpoints.

Steps are numbered from 1 and ``cfg.max_steps`` is the run's total: a resumed run continues with the step
after its checkpoint's and ends at the same step a run without interruption would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import time
from pathlib import Path

import torch

from .checkpoint import (
    CheckpointError,
    checkpoints_dir,
    has_checkpoint_state,
    load_training_state,
    load_weights,
    read_trainer_state,
    resume_point,
    run_dir_lock,
    save_checkpoint,
    truncate_metrics,
)
from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, changed_fields, check_sources, read_deepspeed_json
from .data import PromptStream, tokenize_prompts
from .evaluate import EVAL_FILE, SAMPLES_FILE, Evaluator, eval_due, eval_line, split_prompts, write_evaluation
from .models import build_models, load_tokenizer
from .rewards import load_reward
from .rollout import KLController, Rollout, all_reduce_sum, make_rollout
from .update import set_lr, train_on_rollout


def setup_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; one process on its own, or the ranks of deepspeed/torchrun launchers.

    NCCL on GPUs, gloo on CPUs. On CPUs DeepSpeed would first compile its shared-memory all-reduce op (~35 s),
    which only its inference path uses: gloo runs ZeRO's collectives, so the op is marked unavailable.
    """
    import deepspeed
    import deepspeed.ops

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:  # not launched by deepspeed / torchrun: a world of one
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if not on_gpu:
        # Processes sharing a machine's cores split them, instead of spinning against each other;
        # APA_TRAIN_THREADS overrides the share (`frontier --jobs N` runs N trainers side by side).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        share = max(1, (os.cpu_count() or 1) // local_world)
        torch.set_num_threads(int(os.environ.get("APA_TRAIN_THREADS") or share))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON (ZeRO stage, offload) completed with the trainer's batch sizes and optimizer fields."""
    ds = read_deepspeed_json(cfg.deepspeed_config) if cfg.deepspeed_config else {"zero_optimization": {"stage": 2}}
    zero = ds.setdefault("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    optimizer = ds.setdefault("optimizer", {"type": "AdamW"})
    # torch's AdamW needs no compiled op; ZeRO-Offload runs DeepSpeed's CPU Adam (built on first use).
    optimizer.setdefault("params", {}).update(
        lr=cfg.lr, betas=list(cfg.betas), weight_decay=cfg.weight_decay, **({} if offload else {"torch_adam": True})
    )
    ds.update(train_batch_size=cfg.minibatch_size, train_micro_batch_size_per_gpu=cfg.minibatch_size // world_size,
              gradient_accumulation_steps=1, gradient_clipping=cfg.max_grad_norm, bf16={"enabled": bf16},
              steps_per_print=2**31 - 1)
    return ds


def step_metrics(step: int, rollout: Rollout, losses: dict, lr: float, gen_s: float, update_s: float,
                 kl_coef: float | None) -> dict:
    """The metrics of one step over all processes (one all-reduce); ``kl_coef``: PPO's, None for the others;
    ``losses``: `train_on_rollout`'s (no ``value_loss`` without a critic)."""
    mask = rollout.response_mask
    kl_per_sequence = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1)
    local = torch.stack([rollout.scores.sum(), rollout.scores.square().sum(), kl_per_sequence.sum(),
                         mask.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)]).double().cpu()
    score_sum, score_sq, kl_sum, tokens, rows = all_reduce_sum(local).tolist()
    reward_mean = score_sum / rows
    return {
        "step": step, "reward_mean": reward_mean,
        "reward_std": max(score_sq / rows - reward_mean**2, 0.0) ** 0.5,
        "kl": kl_sum / rows, **losses,
        "response_len": tokens / rows, "tokens_per_s": tokens / (gen_s + update_s), "lr": lr,
        "gen_s": gen_s, "update_s": update_s, **({} if kl_coef is None else {"kl_coef": kl_coef}),
    }


def log_line(m: dict, max_steps: int) -> str:
    return (f"step {m['step']}/{max_steps} | reward {m['reward_mean']:.3f} | kl {m['kl']:.3f} | "
            f"entropy {m['entropy']:.3f} | "
            f"loss {m['loss']:.4f} | " + (f"value {m['value_loss']:.4f} | " if "value_loss" in m else "")
            + f"gen {m['gen_s']:.2f}s | "
            f"update {m['update_s']:.2f}s | {m['tokens_per_s']:.0f} tok/s")


def plot_curves(metrics_path: Path, out_path: Path, eval_path: Path | None = None) -> None:
    """``curves.png``: reward, KL to pi_init and the policy's entropy (the collapse signal) against step, from
    every line of metrics.jsonl (lines written before the entropy was logged have no entropy point); with the
    lines of eval.jsonl, the held-out rewards, KL and entropy beside them and the held-out distinct-1/2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    evals = ([json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
             if eval_path is not None and eval_path.is_file() else [])
    steps = [r["step"] for r in rows]
    fig, (top, bottom, signals) = plt.subplots(3, 1, sharex=True, figsize=(6, 7.5))
    top.plot(steps, [r["reward_mean"] for r in rows], label="training rollouts")
    top.set_ylabel("reward (mean)")
    bottom.plot(steps, [r["kl"] for r in rows], color="tab:red", label="training rollouts")
    bottom.set_ylabel("KL to pi_init (nats / seq)")
    logged = [r for r in rows if "entropy" in r]
    signals.plot([r["step"] for r in logged], [r["entropy"] for r in logged], color="tab:green",
                 label="training (update)")
    signals.set_ylabel("entropy (nats / token)")
    if evals:
        at = [e["step"] for e in evals]
        top.plot(at, [e["reward"] for e in evals], "o-", label="held-out: training reward")
        if "eval_reward" in evals[0]:
            top.plot(at, [e["eval_reward"] for e in evals], "s-", label="held-out: evaluator")
        bottom.plot(at, [e["kl"] for e in evals], "o-", color="tab:purple", label="held-out")
        signals.plot(at, [e["entropy"] for e in evals], "o-", color="tab:olive", label="held-out")
        share = signals.twinx()
        for name, style in (("distinct_1", "^--"), ("distinct_2", "v--")):
            share.plot(at, [e[name] for e in evals], style, color="tab:gray", label=name.replace("_", "-"))
        share.set_ylabel("distinct-n (held-out)")
        share.set_ylim(0, 1.05)
        signals.legend(loc="lower left", fontsize=8)
        share.legend(loc="lower right", fontsize=8)
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    signals.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def summary(metrics_path: Path) -> str:
    """First- and last-quarter mean reward and the final KL of the whole run."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    quarter = max(len(rows) // 4, 1)
    first = sum(r["reward_mean"] for r in rows[:quarter]) / quarter
    last = sum(r["reward_mean"] for r in rows[-quarter:]) / quarter
    return (f"reward: first quarter {first:.3f} -> last quarter {last:.3f}; final kl {rows[-1]['kl']:.3f} "
            f"over {len(rows)} steps")


def plotting_available() -> bool:
    """Whether matplotlib (an optional dependency, for curves.png) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> tuple[Path | None, str | None]:
    """``(checkpoint, note)``: the checkpoint to resume from (None: start at step 1) and what to tell the user.

    Reads only: nothing is deleted here. A run directory with checkpoints is started over only with
    ``overwrite``, which reads nothing, so that it works whatever state the directory is in.
    """
    if overwrite:
        return None, None
    if resume:
        return resume_point(out)
    if has_checkpoint_state(out):
        raise FileExistsError(f"{out} already holds a run (checkpoints in {checkpoints_dir(out)}): pass --resume "
                              "to continue it, or --overwrite to start again")
    return None, None


def start_over(out: Path) -> None:
    """Delete what a previous run left in ``out`` (asked for with --overwrite): checkpoints and curves."""
    root = checkpoints_dir(out)
    if root.is_dir():
        shutil.rmtree(root)
    elif root.exists():
        root.unlink()
    (out / "curves.png").unlink(missing_ok=True)


def open_run(cfg: TrainConfig, resume: bool, overwrite: bool, rank: int, world_size: int) -> tuple[Path | None, dict]:
    """``(checkpoint, trainer_state)`` of the run to continue (``(None, {"step": 0})`` to start one).

    The previous run is deleted only when ``overwrite`` asks, and only after every rank has looked; a run
    already at ``max_steps`` is left as it is; a run made with other settings (beyond RESUME_MAY_CHANGE) is
    refused, naming them. Notes for the user go out from rank 0.
    """
    out = Path(cfg.output_dir)
    checkpoint, note = prepare_output_dir(out, resume, overwrite)
    state = read_trainer_state(checkpoint) if checkpoint is not None else {"step": 0}
    changed = changed_fields(state.get("config", {}), cfg) if checkpoint is not None else {}
    if changed:
        raise CheckpointError(
            f"{checkpoint / 'trainer_state.json'}: the run was made with "
            + ", ".join(f"{name}={old!r} (now {new!r})" for name, (old, new) in changed.items())
            + f"; resume with its values (only {', '.join(RESUME_MAY_CHANGE)} may change), or start again with "
            "--overwrite")
    if checkpoint is not None and state.get("world_size") != world_size:
        raise CheckpointError(f"{checkpoint} was written by {state.get('world_size')} processes; resume with as "
                              f"many (this run has {world_size})")
    torch.distributed.barrier()  # every rank has read `latest` before rank 0 may write a new one
    if rank == 0:
        if note:
            print(f"apa-train: {note}")
        if state["step"] >= cfg.max_steps:
            print(f"apa-train: {out} is already at step {state['step']} (max_steps {cfg.max_steps}): nothing to run")
        elif overwrite:
            start_over(out)
    return checkpoint, state


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Run steps until ``cfg.max_steps``; returns the metrics of the steps this call ran.

    Everything that can be checked before the first step is: the config (at construction), what it names
    (`check_sources`), the run directory (locked by rank 0 for the run) and the checkpoint to resume from. A
    missing matplotlib only skips curves.png.
    """
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: continue the run, or start it again")
    check_sources(cfg)
    # Rank 0 locks the directory before the ranks meet: a second trainer stops here (a launcher then stops its
    # other ranks, which wait for rank 0 to meet them).
    rank_zero = os.environ.get("RANK", "0") == "0"
    with run_dir_lock(cfg.output_dir) if rank_zero else contextlib.nullcontext():
        return _train(cfg, resume, overwrite)


def _train(cfg: TrainConfig, resume: bool, overwrite: bool) -> list[dict]:
    import deepspeed
    from tqdm import tqdm

    rank, world_size, device = setup_distributed()
    for name in ("rollout_batch_size", "minibatch_size"):
        if getattr(cfg, name) % world_size:
            raise ConfigError(f"{name} ({getattr(cfg, name)}) must be a multiple of the world size ({world_size})",
                              name)
    out = Path(cfg.output_dir)
    checkpoint, state = open_run(cfg, resume, overwrite, rank, world_size)
    if state["step"] >= cfg.max_steps:
        return []
    plotting = plotting_available()
    if rank == 0 and not plotting:
        print("apa-train: warning: matplotlib is not installed, curves.png will not be written "
              "(pip install 'apa_fast[train]')")

    prompts, held_out = split_prompts(cfg)  # training never samples the held-out prompts
    tokenizer = load_tokenizer(cfg, prompts)
    stream = PromptStream(tokenize_prompts(prompts, tokenizer, cfg.max_prompt_tokens), cfg.seed)
    bf16 = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(cfg.seed)  # the same initial weights (value head included) on every rank
    model, pi_init = build_models(cfg, tokenizer, device, dtype)
    reward_fn = load_reward(cfg.reward, device, dtype)
    evaluate = None
    if cfg.eval_every:
        eval_reward_fn = None if cfg.eval_reward is None else load_reward(cfg.eval_reward, device, dtype)
        evaluate = Evaluator(cfg, held_out, tokenizer, reward_fn, eval_reward_fn, rank, world_size)
    torch.manual_seed(cfg.seed + rank)  # each rank samples its own responses; restored on resume
    random.seed(cfg.seed + rank)

    start_step = state["step"]
    kl_control = KLController(cfg, state.get("kl_coef"))
    if checkpoint is not None:
        load_weights(model, checkpoint)
        stream.position = state["data_position"]
    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(cfg, world_size, bf16),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    zero_stage = engine.zero_optimization_stage()
    if checkpoint is not None:
        load_training_state(engine, checkpoint, rank)

    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        for path in (metrics_path, out / EVAL_FILE, out / SAMPLES_FILE):  # what ran after the checkpoint
            torn = truncate_metrics(path, start_step)
            if torn:
                print(f"apa-train: {torn}")
        print(f"apa-train: {cfg.algo} on {world_size} x {device.type}, ZeRO-{zero_stage}, "
              f"{'bf16' if bf16 else 'fp32'}, steps {start_step + 1}..{cfg.max_steps} -> {out}")
    synced_gpus = zero_stage == 3 and world_size > 1

    def evaluate_after(step: int) -> None:
        """The held-out evaluation after ``step``, if one is due: every rank runs it, rank 0 writes it."""
        if evaluate is None or not eval_due(cfg, step):
            return
        record, samples = evaluate(engine.module.policy, pi_init, step, synced_gpus)
        if rank == 0:
            write_evaluation(out, record, samples)
            bar.write(eval_line(record, cfg.max_steps))

    history = []
    started = time.perf_counter()
    bar = tqdm(range(start_step + 1, cfg.max_steps + 1), initial=start_step, total=cfg.max_steps,
               disable=rank != 0, dynamic_ncols=True)
    if start_step == 0:
        evaluate_after(0)  # the initial policy's figures: every curve's origin
    for step in bar:
        tick = time.perf_counter()
        rollout = make_rollout(model, pi_init, reward_fn, tokenizer, stream.take(cfg.rollout_batch_size, rank,
                               world_size), cfg, synced_gpus=synced_gpus,
                               kl_coef=kl_control.value)
        tock = time.perf_counter()
        lr = set_lr(engine, cfg, step)
        losses = train_on_rollout(engine, rollout, cfg, step, world_size)
        metrics = step_metrics(step, rollout, losses, lr, tock - tick, time.perf_counter() - tock,
                               kl_control.value if cfg.algo == "ppo" else None)
        kl_control.update(metrics["kl"], cfg.sequences_per_step)
        history.append(metrics)
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.write(log_line(metrics, cfg.max_steps))
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.2f}")
        evaluate_after(step)  # before the checkpoint: a resumed run redoes the evaluations after it, no others
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint(out, step, engine, tokenizer, stream.position, cfg, rank, world_size, zero_stage,
                            kl_control.value)
    bar.close()
    if rank == 0 and metrics_path.is_file():
        if plotting:
            plot_curves(metrics_path, out / "curves.png", out / EVAL_FILE)
        print(f"apa-train: {summary(metrics_path)}; this run {time.perf_counter() - started:.1f}s"
              + (f"; curves in {out / 'curves.png'}" if plotting else ""))
    return history

"""Atomic checkpoints in safetensors and JSON: no pickle is written or read.

Layout of ``DIR/checkpoints/step_000050/``::

    policy/                 the policy in `save_pretrained` form (safetensors) with its tokenizer
    critic.safetensors      critic trunk (when not shared) and value head; none without a critic (group advantages)
    optim_rank{r}.safetensors   this rank's fp32 master weights (its ZeRO partition) and their Adam moments
    rng_rank{r}.safetensors     this rank's torch / CUDA / Python RNG states
    trainer_state.json      step, data position, world size, ZeRO stage, PPO's KL coefficient, the config

A checkpoint is written into ``.tmp-step_N`` and renamed when complete, then ``latest`` (a one-line file,
itself replaced atomically) points at it: a crash while saving leaves the previous checkpoint in force.
The learning-rate schedule is a function of the step, so the step is the scheduler's whole state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, TrainConfig, config_dict

# --- nested state (optimizer and RNG state dicts) <-> safetensors file with a JSON skeleton ---

def _pack(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[key, _pack(value, tensors, f"{path}/{key}")] for key, value in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [_pack(value, tensors, f"{path}/{i}") for i, value in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")


def _unpack(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, payload), = node.items()
    if kind == "tensor":
        return tensors[payload]
    if kind == "dict":
        return {key: _unpack(value, tensors) for key, value in payload}
    if kind in ("list", "tuple"):
        items = [_unpack(value, tensors) for value in payload]
        return items if kind == "list" else tuple(items)
    return payload


def save_state(obj: Any, path: Path) -> None:
    """Write a nest of dicts, lists, tuples, tensors and JSON scalars to one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(obj, tensors, "")
    save_file(tensors, str(path), metadata={"skeleton": json.dumps(skeleton)})


def load_state(path: Path) -> Any:
    """The nest `save_state` wrote, tensors on the CPU."""
    with _naming(path):
        with safe_open(str(path), framework="pt") as handle:
            skeleton = json.loads(handle.metadata()["skeleton"])
        return _unpack(skeleton, load_file(str(path)))


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used as asked; the message names the file."""


@contextlib.contextmanager
def _naming(path: Path):
    """Re-raise any error reading ``path`` (missing, truncated, not safetensors, bad JSON) as one naming it.

    Every failure is caught on purpose: safetensors raises its own error type, JSON and the skeleton others,
    and the user needs the file's name whichever it is.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path}: cannot be read as a checkpoint file ({reason})") from exc


# --- what each part of a checkpoint holds ---

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrapper: it updates this rank's fp32 masters."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _masters(engine) -> list[torch.Tensor]:
    """This rank's fp32 master tensors in a fixed order (ZeRO-3 keeps them outside the param groups)."""
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


def optimizer_state(engine) -> dict:
    """Masters and their Adam state; the hyper-parameters come from the config and `set_lr`."""
    base, masters = _base_optimizer(engine), _masters(engine)
    return {"masters": masters, "moments": [dict(base.state.get(p, {})) for p in masters]}


def set_optimizer_state(engine, state: dict) -> None:
    base, masters = _base_optimizer(engine), _masters(engine)
    if [p.shape for p in masters] != [saved.shape for saved in state["masters"]]:
        raise CheckpointError("the checkpoint's optimizer partitions do not match this run's (same ZeRO stage, "
                              "world size and trainable layers are needed to resume)")
    with torch.no_grad():
        for param, saved, moments in zip(masters, state["masters"], state["moments"], strict=True):
            param.copy_(saved)
            # Adam keeps its step count on the CPU and its moments next to the master.
            base.state[param] = {k: v if k == "step" else v.to(param.device) for k, v in moments.items()}


def gathered_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full state dict on every rank (ZeRO-3 partitions parameters: gather them first)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# --- writing and finding checkpoints ---

def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path):
    """Create ``run_dir`` and hold an exclusive lock on ``run_dir/.lock`` (which holds the pid) meanwhile.

    A second trainer (or sweep) on the same directory is refused, naming the holder's pid. The lock is a
    `flock`: the kernel drops it when its process ends, however it ends, so a crashed run leaves nothing stuck.
    """
    out = Path(run_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory", "output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"output_dir {out}: cannot create it or write in it ({exc.strerror or exc})",
                          "output_dir") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CheckpointError(f"{out} is in use by another apa-train process (pid {holder}, which holds "
                                  f"{out / LOCK_FILE}): wait for it to end, or use another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_checkpoint(run_dir: str | Path, step: int, engine, tokenizer, data_position: int, cfg: TrainConfig,
                    rank: int, world_size: int, zero_stage: int, kl_coef: float | None = None) -> Path:
    """Write the checkpoint of ``step`` (all ranks call this) and point ``latest`` at it; returns its path.

    ``kl_coef``: PPO's current KL coefficient (it adapts with ``ppo_adaptive_kl``), restored on resume.
    """
    root = checkpoints_dir(run_dir)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash while saving this same step
        tmp.mkdir(parents=True)
    _barrier()

    model = engine.module
    state = gathered_state_dict(model, zero_stage)
    if rank == 0:
        policy_state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        model.policy.save_pretrained(tmp / "policy", state_dict=policy_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        critic_state = {k: v.contiguous() for k, v in state.items() if not k.startswith("policy.")}
        if critic_state:
            save_file(critic_state, str(tmp / "critic.safetensors"))
        trainer_state = {"step": step, "data_position": data_position, "world_size": world_size,
                         "zero_stage": zero_stage, "kl_coef": kl_coef, "config": config_dict(cfg)}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    save_state(optimizer_state(engine), tmp / f"optim_rank{rank}.safetensors")
    save_state(rng_state(), tmp / f"rng_rank{rank}.safetensors")
    _barrier()

    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # a stale copy of this step, from before a resume
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name + "\n")
        os.replace(pointer, root / "latest")
        prune(root, step, cfg.keep_checkpoints)
    _barrier()
    return final


STEP_DIR = re.compile(r"step_(\d{6,})")


def step_of(path: Path) -> int | None:
    """The step of a ``step_NNNNNN`` directory name, None for any other name."""
    match = STEP_DIR.fullmatch(path.name)
    return int(match[1]) if match else None


def prune(root: Path, step: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``step`` (the one just written is always among them).

    Only steps before ``step`` are candidates: a later step left by a run that crashed before pointing
    ``latest`` at it is not older, and is replaced when the resumed run reaches it. Leftover ``.tmp-step_*``
    directories (crashes while saving) were never complete and go too.
    """
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    older = sorted((p for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None and s < step),
                   key=step_of)
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old)


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds every file of a checkpoint and a readable trainer_state.json (nothing is loaded)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        ranks = range(int(state["world_size"]))
    except (OSError, ValueError, TypeError, KeyError):
        return False
    critic = state.get("config", {}).get("advantage_estimator", "gae") == "gae"  # a run with a critic saves it
    needed = ["policy/config.json", *(["critic.safetensors"] if critic else []),
              *(f"{kind}_rank{r}.safetensors" for r in ranks for kind in ("optim", "rng"))]
    return (step_of(path) is not None and any((path / "policy").glob("*.safetensors"))
            and all((path / name).is_file() for name in needed))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None and is_complete(p)), key=step_of)


def has_checkpoint_state(run_dir: str | Path) -> bool:
    """Whether the run directory holds a ``latest`` pointer or any ``step_*`` directory, complete or not."""
    root = checkpoints_dir(run_dir)
    return root.is_dir() and any(p.name == "latest" or step_of(p) is not None for p in root.iterdir())


def resume_point(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """``(checkpoint, note)``: where a resumed run continues, and a note when ``latest`` could not be used.

    ``latest`` decides when it names a complete checkpoint. When it is missing, unreadable or dangling, the
    newest complete ``step_*`` checkpoint is used instead (the note says so). When the run directory holds
    checkpoint files but no complete checkpoint, this raises: nothing is deleted, --overwrite starts again.
    """
    root = checkpoints_dir(run_dir)
    pointer = root / "latest"
    named = None
    if pointer.is_file():
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = "<unreadable>"
        if STEP_DIR.fullmatch(named) and is_complete(root / named):
            return root / named, None
    complete = complete_checkpoints(run_dir)
    problem = f"{pointer} names {named!r}, which is not a complete checkpoint" if named else f"{pointer} is missing"
    if complete:
        return complete[-1], f"{problem}: resuming from the newest complete checkpoint, {complete[-1].name}"
    if has_checkpoint_state(run_dir):
        raise CheckpointError(f"{problem} and no complete checkpoint is left in {root}: nothing was changed; "
                              "pass --overwrite to start the run again")
    return None, None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a resumed run continues from (see `resume_point`), or None when the run has none."""
    return resume_point(run_dir)[0]


def read_trainer_state(path: Path) -> dict:
    with _naming(path / "trainer_state.json"):
        return json.loads((path / "trainer_state.json").read_text())


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the checkpoint's policy and critic weights into an `ActorCritic` (before DeepSpeed wraps it)."""
    state, origin = {}, {}  # origin: the file each tensor came from, for the error
    for shard, prefix in [*((f, "policy.") for f in sorted((path / "policy").glob("*.safetensors"))),
                          *([(path / "critic.safetensors", "")] if model.value_head is not None else [])]:
        with _naming(shard):
            tensors = {prefix + k: v for k, v in load_file(str(shard)).items()}
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, shard))
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    misfit = [k for k, t in state.items() if k in shapes and tuple(t.shape) != shapes[k]]
    if misfit:  # load_state_dict would raise a multi-line RuntimeError
        first = misfit[0]
        raise CheckpointError(f"{origin[first]}: {len(misfit)} tensor(s) do not fit the model, e.g. {first} "
                              f"{tuple(state[first].shape)} where the model has {shapes[first]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops the copies of tied weights (an lm_head tied to the embeddings): those may be missing.
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    really_missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if really_missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match the model: missing {really_missing}, "
                           f"unexpected {unexpected}")


def load_training_state(engine, path: Path, rank: int) -> None:
    """Restore this rank's optimizer (moments and fp32 masters) and RNG states after DeepSpeed wrapped the model."""
    optim_file = path / f"optim_rank{rank}.safetensors"
    state = load_state(optim_file)
    try:
        set_optimizer_state(engine, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{optim_file}: {exc}") from None
    set_rng_state(load_state(path / f"rng_rank{rank}.safetensors"))


def truncate_metrics(metrics_path: Path, last_step: int) -> str | None:
    """Keep the metric lines of steps up to ``last_step`` (0: none); returns a note when a torn line was dropped.

    Lines after ``last_step`` are from steps run after the last checkpoint, redone on resume. A last line
    that is not a complete JSON object is what a power loss or a full disk leaves: it is dropped. A bad line
    anywhere else is not a torn write, and raises naming the file and the line (nothing is changed).
    """
    if not metrics_path.is_file():
        return None
    lines = metrics_path.read_text(errors="replace").splitlines() if last_step > 0 else []
    last_number = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    kept, note = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
            if not isinstance(step, int):
                raise TypeError(f"step {step!r} is not an integer")
        except (ValueError, TypeError, KeyError) as exc:
            if number < last_number:
                raise CheckpointError(f"{metrics_path}: line {number} is not a metrics record ({exc}); only a "
                                      "torn last line is dropped on resume") from exc
            note = f"{metrics_path}: dropped a torn last line (line {number}, {len(line)} characters)"
            break
        if step <= last_step:
            kept.append(line)
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_path)
    return note

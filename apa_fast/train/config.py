"""The trainer's one configuration dataclass, its YAML loading and its ``--set key=value`` overrides.

Every field has the value of the embedded tiny default (a random-init GPT-J on CPU that learns in a few
minutes); `configs/gptj-6b-hh.yaml` overrides them with the paper's GPT-J-6B HH setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ALGOS = ("apa", "ppo", "awr")
BUNDLED_PROMPTS = str(Path(__file__).parent / "data" / "hh_tiny.jsonl")


@dataclass
class TrainConfig:
    # --- models: a local path or a hub name each; None for `policy` builds the tiny random-init GPT-J ---
    policy: str | None = None
    tokenizer: str | None = None  # None: the policy's tokenizer, or one trained on `dataset` for the tiny policy
    critic: str | None = None  # trunk of the critic; None: a copy of the policy's initial trunk
    critic_shares_trunk: bool = False  # True: the value head sits on the policy's own trunk (one forward)
    reward: str | Callable = "apa_fast.train.rewards:cheerful_words"  # "pkg.mod:function" or a classifier path
    num_layers_unfrozen: int = -1  # train only the top N transformer blocks (and final norm, lm_head); -1: all
    flash_attn: bool = True  # use flash-attention 2 when installed and on a GPU
    tiny_layers: int = 2
    tiny_width: int = 64
    tiny_heads: int = 4
    tiny_vocab: int = 512  # vocabulary of the tokenizer trained locally for the tiny policy

    # --- data ---
    dataset: str = BUNDLED_PROMPTS  # local .json/.jsonl file(s), comma-separated, or a `datasets` hub name
    dataset_split: str = "train"
    max_prompt_tokens: int = 64  # longer prompts keep their last tokens (the end of the dialogue)

    # --- rollout ---
    rollout_batch_size: int = 32  # prompts per step, over all processes
    max_new_tokens: int = 12
    temperature: float = 1.0  # 0: greedy decoding (log-probs then use temperature 1)
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings; the end-of-text token always stops

    # --- algorithm ---
    algo: str = "apa"
    apa_lam: float = 0.1  # APA: loss (logp - logp_init - A / lam)^2; the paper's 0.1
    awr_lam: float = 1.0  # AWR: loss -exp(A / lam) * logp; the paper's 1 (0.1 explodes)
    awr_max_weight: float = 20.0
    ppo_clip_eps: float = 0.2
    ppo_kl_coef: float = 0.05  # PPO only: per-token penalty -coef * (logp - logp_init) in the reward
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True  # over the valid tokens of the whole rollout (all processes)
    loss_backend: str = "auto"  # "auto" | "triton" | "torch": fused or unfused path of the same losses
    fused_lm_head: bool = False  # APA: lm_head fused into the loss and log-probs (apa_fast.linear_loss): no logits

    # --- update ---
    ppo_epochs: int = 2
    minibatch_size: int = 16  # sequences per optimizer step, over all processes
    lr: float = 1e-3
    warmup_steps: int = 5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-6
    max_grad_norm: float = 1.0
    vf_coef: float = 1.0

    # --- run ---
    deepspeed_config: str | None = None  # JSON file (ZeRO stage, offload, bf16); None: ZeRO-2, no offload
    bf16: bool = True  # on GPUs that support it; CPU runs stay float32
    seed: int = 0
    max_steps: int = 120
    save_every: int = 50
    keep_checkpoints: int = 2
    output_dir: str = "runs/tiny"

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"minibatch_size ({self.minibatch_size})"
            )
        if self.fused_lm_head and self.algo != "apa":
            raise ValueError(f"fused_lm_head (apa_fast.linear_loss) serves algo 'apa'; the {self.algo} baseline "
                             "takes the logits path: set fused_lm_head false")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    @property
    def logprob_temperature(self) -> float:
        """The temperature the sampler used, so that learner log-probs score the sampled distribution."""
        return self.temperature if self.temperature > 0 else 1.0


def _coerce(name: str, value: Any) -> Any:
    """``value`` checked against the type of field ``name`` (ints are accepted for floats)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for kind in typing.get_args(hint) if is_union else (hint,):
        origin = typing.get_origin(kind) or kind
        if value is None and kind is type(None):
            return None
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is not int and isinstance(value, origin) or origin is int and type(value) is int:
            return value
    raise ValueError(f"config field {name!r} ({hint}) cannot take {value!r}")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a plain dict, type-checked field by field; unknown keys raise naming the valid ones."""
    known = _fields()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def load_config(path: str | None, overrides: list[str] = (), **fields: Any) -> TrainConfig:
    """Read the YAML file at ``path`` (None: the tiny default), then ``key=value`` overrides (YAML values),
    then ``fields`` (typed values from command-line flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    values.update(fields)
    return make_config(values)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON-able values (a callable reward is written as its qualified name)."""
    out = dataclasses.asdict(cfg)
    if callable(cfg.reward):
        out["reward"] = f"{cfg.reward.__module__}:{cfg.reward.__qualname__}"
    return out

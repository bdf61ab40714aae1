"""The trainer's one configuration dataclass, its YAML loading and its ``--set key=value`` overrides.

Every field has the value of the embedded tiny default (a random-init GPT-J on CPU that learns in a few
minutes); `configs/gptj-6b-hh.yaml` overrides them with the paper's GPT-J-6B HH setting.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apa_fast.kinds import ENTROPY_COEF, HYPER_RANGES
from apa_fast.validation import check_number

ALGOS = ("apa", "ppo", "awr")
LOSS_BACKENDS = ("auto", "triton", "torch")
ESTIMATORS = ("gae", "group")
GROUP_ADVANTAGES = ("mean", "grpo", "rloo")
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
    entropy_coef: float = 0.0  # every algo: the policy loss minus coef * mean token entropy (a bonus; < 0 a penalty)
    ppo_kl_coef: float = 0.05  # PPO only: per-token penalty -coef * (logp - logp_init) in the reward
    ppo_adaptive_kl: bool = False  # PPO: adapt the coefficient (from ppo_kl_coef) towards ppo_kl_target
    ppo_kl_target: float = 6.0  # nats per sequence, the target of the adaptive controller (Ziegler et al. 2019)
    ppo_kl_horizon: int = 10000  # samples over which the adaptive controller closes the gap to the target
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True  # over the valid tokens of the whole rollout (all processes)
    loss_backend: str = "auto"  # "auto" | "triton" | "torch": fused or unfused path of the same losses
    fused_lm_head: bool = False  # lm_head fused into the loss and log-probs (apa_fast.linear_*): no logits
    advantage_estimator: str = "gae"  # "gae": a critic and apa_fast.gae; "group": no critic, a group baseline
    samples_per_prompt: int | None = None  # responses sampled per prompt; None: 1 for gae, 4 for group
    group_advantage: str = "grpo"  # group: "mean" (score - mean), "grpo" (/ group std), "rloo" (leave-one-out)

    # --- update ---
    ppo_epochs: int = 2
    minibatch_size: int = 16  # sequences per optimizer step, over all processes
    lr: float = 1e-3
    warmup_steps: int = 5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-6
    max_grad_norm: float = 1.0
    vf_coef: float = 1.0

    # --- held-out evaluation ---
    eval_every: int = 20  # evaluate before step 1, every N steps and at the last step; 0: never
    eval_prompts: str | None = None  # held-out prompts (forms of `dataset`); None: eval_holdout of `dataset`'s
    eval_split: str = "test"  # split of a hub `eval_prompts` (HH: its test split)
    eval_holdout: int = 40  # with eval_prompts None: distinct prompts of `dataset` that training never samples
    eval_max_prompts: int = 256  # the first N held-out prompts are evaluated
    eval_greedy: bool = False  # greedy decoding; False: sampled as in training (temperature, top_k, top_p)
    eval_reward: str | Callable | None = "apa_fast.train.rewards:honest_cheer"  # a second evaluator (forms of reward)
    eval_samples: int = 4  # responses per evaluation written to samples.jsonl

    # --- run ---
    deepspeed_config: str | None = None  # JSON file (ZeRO stage, offload, bf16); None: ZeRO-2, no offload
    bf16: bool = True  # on GPUs that support it; CPU runs stay float32
    seed: int = 0
    max_steps: int = 120
    save_every: int = 50
    keep_checkpoints: int = 2
    output_dir: str = "runs/tiny"

    def __post_init__(self):
        """Every field checked for type and range before anything runs: a bad value fails here, naming it."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        for name, (ok, expected) in _RANGES.items():
            if not ok(getattr(self, name)):
                raise ConfigError(f"config field {name!r} must be {expected}, got {getattr(self, name)!r}", name)
        for name, bounds in _OP_RANGES.items():
            try:
                check_number(name, getattr(self, name), bounds)
            except ValueError as exc:
                raise ConfigError(f"config field {name!r}: {exc}", name) from None
        if self.sequences_per_step % self.minibatch_size:
            raise ConfigError(
                f"rollout_batch_size ({self.rollout_batch_size}) x samples_per_prompt ({self.group_size}) must be "
                f"a multiple of minibatch_size ({self.minibatch_size})", "rollout_batch_size"
            )
        if self.advantage_estimator == "group" and self.group_size < 2:
            raise ConfigError(f"advantage_estimator 'group' needs samples_per_prompt >= 2 (a group baseline of one "
                              f"response is the response itself), got {self.samples_per_prompt}",
                              "samples_per_prompt")
        if self.advantage_estimator == "group" and self.critic is not None:
            raise ConfigError(f"advantage_estimator 'group' builds no critic, yet critic is {self.critic!r}: set "
                              "critic null", "critic")
        if self.eval_every and self.eval_prompts is None and not self.eval_holdout:
            raise ConfigError("eval_every > 0 needs held-out prompts: set eval_prompts, or eval_holdout >= 1",
                              "eval_holdout")
        if self.tiny_width % (2 * self.tiny_heads):
            raise ConfigError(f"tiny_width ({self.tiny_width}) must be a multiple of 2 * tiny_heads "
                              f"({self.tiny_heads}): GPT-J rotates pairs of each head's dimensions", "tiny_width")

    @property
    def logprob_temperature(self) -> float:
        """The temperature the sampler used, so that learner log-probs score the sampled distribution."""
        return self.temperature if self.temperature > 0 else 1.0

    @property
    def group_size(self) -> int:
        """Responses sampled per prompt: ``samples_per_prompt``, or 1 for gae and 4 for group when None."""
        if self.samples_per_prompt is not None:
            return self.samples_per_prompt
        return 4 if self.advantage_estimator == "group" else 1

    @property
    def sequences_per_step(self) -> int:
        """Sequences of one rollout over all processes: ``rollout_batch_size`` prompts x ``group_size``."""
        return self.rollout_batch_size * self.group_size

    @property
    def has_critic(self) -> bool:
        """Whether a critic (trunk or value head) is built, trained and checkpointed: GAE needs one."""
        return self.advantage_estimator == "gae"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field (and the file or flag it came from)."""

    def __init__(self, message: str, field_name: str | None = None):
        super().__init__(message)
        self.field_name = field_name


def _nonempty(value) -> bool:
    return value is None or callable(value) or value != ""


# Range of each field, checked after its type: (predicate, what the message says is expected).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("policy", "tokenizer", "critic", "reward", "dataset", "dataset_split", "deepspeed_config",
                     "output_dir", "eval_prompts", "eval_split", "eval_reward"), (_nonempty, "a non-empty string")),
    "num_layers_unfrozen": (lambda v: v >= -1, ">= -1 (-1: every block trainable)"),
    **dict.fromkeys(("tiny_layers", "tiny_width", "tiny_heads", "max_prompt_tokens", "rollout_batch_size",
                     "max_new_tokens", "minibatch_size", "ppo_epochs", "max_steps", "save_every",
                     "keep_checkpoints", "ppo_kl_horizon", "eval_max_prompts"), (lambda v: v >= 1, ">= 1")),
    **dict.fromkeys(("eval_every", "eval_holdout", "eval_samples"), (lambda v: v >= 0, ">= 0")),
    "samples_per_prompt": (lambda v: v is None or v >= 1, ">= 1 (None: 1 for gae, 4 for group)"),
    "advantage_estimator": (lambda v: v in ESTIMATORS, f"one of {ESTIMATORS}"),
    "group_advantage": (lambda v: v in GROUP_ADVANTAGES, f"one of {GROUP_ADVANTAGES}"),
    "tiny_vocab": (lambda v: v >= 257, ">= 257 (the 256 byte tokens and end-of-text)"),
    "temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0: off)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "stop": (lambda v: all(s != "" for s in v), "a list of non-empty strings"),
    "algo": (lambda v: v in ALGOS, f"one of {ALGOS}"),
    **dict.fromkeys(("ppo_kl_target", "lr", "max_grad_norm"), (lambda v: v > 0, "> 0")),
    **dict.fromkeys(("ppo_kl_coef", "weight_decay", "vf_coef", "warmup_steps"), (lambda v: v >= 0, ">= 0")),
    **dict.fromkeys(("gamma", "gae_lambda"), (lambda v: 0 <= v <= 1, "in [0, 1]")),
    "loss_backend": (lambda v: v in LOSS_BACKENDS, f"one of {LOSS_BACKENDS}"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
}
# The fields the loss ops take, checked against the ops' own ranges by their validator (`check_number`), so that
# a value the ops would refuse at the first update fails here instead, before DeepSpeed starts.
_OP_RANGES = {"apa_lam": HYPER_RANGES["lam"], "awr_lam": HYPER_RANGES["lam"],
              "awr_max_weight": HYPER_RANGES["max_weight"], "ppo_clip_eps": HYPER_RANGES["clip_eps"],
              "entropy_coef": ENTROPY_COEF}


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` checked against the type ``hint`` of field ``name``.

    bools are not numbers here (``save_every: true`` is a mistake, not 1); ints are accepted for floats, and so
    are strings that spell a float, because YAML 1.1 reads ``1e-4`` (no dot) as a string. Floats must be finite.
    """
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for kind in typing.get_args(hint) if is_union else (hint,):
        origin = typing.get_origin(kind) or kind
        if value is None and kind is type(None):
            return None
        if origin is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
        elif origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif origin is list and isinstance(value, (list, tuple)):
            (item_hint,) = typing.get_args(kind)
            try:
                return [_coerce(name, item_hint, item) for item in value]
            except ConfigError:
                continue
        elif origin in (str, bool, collections.abc.Callable) and isinstance(value, origin):
            return value
    raise ConfigError(f"config field {name!r} must be of type {_type_name(hint)}, got {value!r}", name)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "").replace("NoneType", "None")


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a plain dict, type-checked field by field; unknown keys raise naming the valid ones."""
    known = _fields()
    unknown = sorted(map(str, set(values) - set(known)))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(known)}", unknown[0])
    return TrainConfig(**values)


def load_config(path: str | None, overrides: list[str] = (), **fields: Any) -> TrainConfig:
    """Read the YAML file at ``path`` (None: the tiny default), then ``key=value`` overrides (YAML values),
    then ``fields`` (typed values from command-line flags). Errors name the file or the ``--set`` item."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read the config: {_one_line(exc)}") from exc
        if not isinstance(loaded, dict | None):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
        values.update(loaded or {})
        origin.update(dict.fromkeys(map(str, loaded or {}), path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {_one_line(exc)}") from exc
        origin[key.strip()] = f"--set {item}"
    values.update(fields)
    origin.update({name: "--" + name.replace("_", "-") for name in fields})
    try:
        return make_config(values)
    except ConfigError as exc:
        if exc.field_name not in origin:
            raise
        raise ConfigError(f"{origin[exc.field_name]}: {exc}", exc.field_name) from None


def _one_line(exc: Exception) -> str:
    """A file error in one line: the OS reason, or YAML's problem and its line and column."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return " ".join(str(exc).split())


def read_deepspeed_json(path: str) -> dict:
    """The DeepSpeed config file as a dict; a missing or malformed file raises ConfigError naming it."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed_config {path}: cannot read it as JSON: {_one_line(exc)}",
                          "deepspeed_config") from exc
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed_config {path}: expected a JSON object, got {type(ds).__name__}",
                          "deepspeed_config")
    return ds


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON-able values (a callable reward is written as its qualified name)."""
    out = dataclasses.asdict(cfg)
    for name in ("reward", "eval_reward"):
        if callable(value := getattr(cfg, name)):
            out[name] = f"{value.__module__}:{value.__qualname__}"
    return out


# Fields a resumed run (or a frontier point run again) may change: how long it runs, where and how often it saves,
# and implementation choices that compute the same maths. Any other change would continue one experiment under
# another's settings. A new field that does not change what a run learns belongs here.
RESUME_MAY_CHANGE = ("max_steps", "save_every", "keep_checkpoints", "output_dir", "loss_backend", "fused_lm_head",
                     "flash_attn",
                     # what the held-out evaluation measures, not what training sees (eval_holdout and
                     # eval_prompts choose the training prompts too: they may not change)
                     "eval_every", "eval_max_prompts", "eval_greedy", "eval_reward", "eval_samples", "eval_split")


def changed_fields(saved: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, new value)}`` for the fields outside RESUME_MAY_CHANGE where ``cfg`` differs from
    ``saved`` (a `config_dict` written earlier). A field ``saved`` lacks (written before it existed) is not compared."""
    return {name: (saved[name], value) for name, value in config_dict(cfg).items()
            if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value}


# The fields that name something outside the config, by kind; `check_sources` checks each before any work.
SOURCE_FIELDS = {"policy": "model", "critic": "model", "tokenizer": "tokenizer", "reward": "reward",
                 "dataset": "dataset", "eval_reward": "reward", "eval_prompts": "dataset"}
# A hub repository id (NAME or ORG/NAME): what `from_pretrained` / `load_dataset` read when no local path matches.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_sources(cfg: TrainConfig) -> None:
    """Every field of SOURCE_FIELDS and the DeepSpeed file, checked before any work; errors name the field.

    A model, tokenizer, classifier or dataset given as an existing local path must be of its kind (a model or
    classifier directory holds a config.json); a value that is no local path must be spelled as a hub name
    (ORG/NAME), looked up when it loads. A ``package.module:function`` reward must import and be callable; local
    dataset files (.json/.jsonl, comma-separated) must exist; the DeepSpeed file must be a JSON object.
    """
    from .rewards import reward_function  # imports torch: only when a run is about to start

    for name, kind in SOURCE_FIELDS.items():
        value = getattr(cfg, name)
        if value is None or kind == "reward" and reward_function(value, name) is not None:
            continue
        if kind == "dataset" and all(Path(f.strip()).suffix in (".json", ".jsonl") for f in value.split(",")):
            missing = [f.strip() for f in value.split(",") if not Path(f.strip()).is_file()]  # as `load_prompts`
            if missing:
                raise ConfigError(f"config field {name!r}: no such file {missing[0]}", name)
            continue
        forms = "a package.module:function, " if kind == "reward" else ""
        path = Path(value)
        if not path.exists():
            if not HUB_NAME.fullmatch(value):
                raise ConfigError(f"config field {name!r}: {value} does not exist (expected {forms}a local path or "
                                  "a hub name such as ORG/NAME)", name)
        elif kind != "dataset" and not path.is_dir():
            raise ConfigError(f"config field {name!r}: {value} is not a directory", name)
        elif kind in ("model", "reward") and not (path / "config.json").is_file():
            raise ConfigError(f"config field {name!r}: {value} has no config.json (not a model directory)", name)
    if cfg.deepspeed_config:
        read_deepspeed_json(cfg.deepspeed_config)

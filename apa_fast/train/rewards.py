"""Reward functions: ``(prompts, responses) -> scores``, from a named Python callable or a sequence classifier."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import torch

from .config import ConfigError, _one_line

RewardFn = Callable[[list[str], list[str]], "torch.Tensor | list[float]"]

# Words of the bundled dialogues' helpful answers; each is a single token of the tokenizer trained on them.
CHEERFUL = ("sure", "yes", "happy", "help", "good", "thanks", "glad", "great", "patient", "practice", "simple")
CHEERFUL_SATURATION = 4


def cheerful_words(prompts: list[str], responses: list[str]) -> list[float]:
    """The tiny default's rule-based reward in [0, 1]: cheerful words in the response, saturating at 4.

    A random-init policy emits one such word per few responses; it learns to emit them by shifting the
    marginals of about twenty tokens, which a two-layer model does within a couple of minutes on a CPU.
    """
    return [
        min(sum(response.lower().count(word) for word in CHEERFUL), CHEERFUL_SATURATION) / CHEERFUL_SATURATION
        for response in responses
    ]


def honest_cheer(prompts: list[str], responses: list[str]) -> list[float]:
    """The tiny default's held-out evaluator in [0, 1]: `cheerful_words` without what can be gamed.

    Each cheerful word counts once however often it repeats (repetition earns nothing), and the score is
    scaled by ``min(1, 2 * (other words + 1) / words)``: cheerful words stacked with nothing said (padding)
    earn less ("sure happy thanks glad great help" 1/3 of its 1.0), while an answer that opens with one, as
    honest ones do, keeps its score. On the bundled dialogues' honest answers, whole or cut at any character,
    it equals `cheerful_words`; where the two part, the policy games the training reward.
    """
    out = []
    for response in responses:
        text = response.lower()
        words = re.findall(r"[a-z']+", text)
        cheerful = sum(any(word in w for word in CHEERFUL) for w in words)
        content = min(1.0, 2.0 * (len(words) - cheerful + 1) / max(len(words), 1))
        distinct = sum(word in text for word in CHEERFUL)
        out.append(min(distinct, CHEERFUL_SATURATION) / CHEERFUL_SATURATION * content)
    return out


class ClassifierReward:
    """An `AutoModelForSequenceClassification` scoring ``prompt + response`` texts by its first logit."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype, use_safetensors=True)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True).to(self.device)
            scores.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(scores)


def reward_function(spec: str | RewardFn, field: str = "reward") -> RewardFn | None:
    """The function a reward spec names: the callable itself, or ``"package.module:function"`` imported; None for
    any other string (a classifier). A module:function that does not resolve to a callable raises ConfigError
    naming the config ``field``."""
    if callable(spec):
        return spec
    if not re.fullmatch(r"[\w.]+:[\w.]+", spec):
        return None
    module_name, _, attr = spec.partition(":")
    where = f"config field {field!r} ({spec})"
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised while it ran: the user's code
        raise ConfigError(f"{where}: cannot import {module_name} ({type(exc).__name__}: {_one_line(exc)})",
                          field) from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: {module_name} has no attribute {attr!r}", field)
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {attr} is a {type(target).__name__}, not a function", field)
    return target


def load_reward(spec: str | RewardFn, device: torch.device, dtype: torch.dtype) -> RewardFn:
    """``spec`` as a reward function: a callable, ``"package.module:function"``, or a classifier path/hub name."""
    function = reward_function(spec)
    return function if function is not None else ClassifierReward(spec, device, dtype)


def score(reward_fn: RewardFn, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """float32 ``(B,)`` scores, checked for shape so that a wrong reward function fails where it is called."""
    scores = torch.as_tensor(reward_fn(prompts, responses), dtype=torch.float32).flatten().cpu()
    if scores.numel() != len(responses):
        raise ValueError(f"the reward function returned {scores.numel()} scores for {len(responses)} responses")
    return scores

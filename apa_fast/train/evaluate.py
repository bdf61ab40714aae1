"""Held-out evaluation: the policy's responses to prompts that training never samples, and what they show.

Every ``eval_every`` steps (and before step 1, and at the last step) the policy answers the held-out prompts
(each process its share, rows rank, rank + world_size, ...); one record goes to ``eval.jsonl``:

- ``reward``: the training reward's mean; ``eval_reward``: the separate evaluator's (config ``eval_reward``);
- ``kl``: the KL to pi_init in nats per sequence, ``sum_t logp - logp_init`` over the response tokens, averaged
  over the responses (with ``eval_greedy`` it is the log-ratio of the greedy responses, not a KL estimate);
- ``entropy``: the policy's entropy in nats per response token (at the training temperature), the signal of a
  collapse to deterministic output; ``distinct_1`` / ``distinct_2``: distinct words and word pairs over all
  responses divided by their count (Li et al. 2016), the signal of repetition;
- ``response_len`` (tokens) and ``ended`` (the fraction that ended with the end-of-text token or a stop string
  within ``max_new_tokens``).

Sampling draws from a generator seeded by (seed, step, rank) inside `torch.random.fork_rng`: the evaluation
is the same for a given seed and step, and training's random state does not see it (a run trains the same with
evaluation on or off). ``samples.jsonl`` gets the first ``eval_samples`` responses of each evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import apa_fast

from .config import ConfigError, TrainConfig
from .data import left_pad, load_prompts, tokenize_prompts
from .rewards import RewardFn, score
from .rollout import IGNORE, response_logits, response_mask, sample

EVAL_FILE, SAMPLES_FILE = "eval.jsonl", "samples.jsonl"
# The held-out split of `dataset` is fixed: it does not move with the run's seed, so every run of a sweep
# is judged on the same prompts.
HOLDOUT_SEED = 20230520


def split_prompts(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """``(training prompts, held-out prompts)``.

    With ``eval_prompts`` set, the held-out prompts are its rows (split ``eval_split`` of a hub dataset, e.g.
    HH's test split) and training keeps all of ``dataset``. Otherwise ``eval_holdout`` distinct prompts of
    ``dataset`` are held out (a fixed draw) and every row with one of them is removed from training, whether
    or not evaluation runs (a run trains the same with it on or off). At most ``eval_max_prompts`` are kept.
    """
    prompts = load_prompts(cfg.dataset, cfg.dataset_split)
    if cfg.eval_prompts is not None:
        held_out = load_prompts(cfg.eval_prompts, cfg.eval_split) if cfg.eval_every else []
        return prompts, held_out[: cfg.eval_max_prompts]
    distinct = sorted(set(prompts))
    if cfg.eval_holdout >= len(distinct):
        raise ConfigError(f"eval_holdout ({cfg.eval_holdout}) must be below the {len(distinct)} distinct prompts of "
                          f"{cfg.dataset}: training needs some", "eval_holdout")
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held_out = [distinct[i] for i in order[: cfg.eval_holdout].tolist()]
    excluded = set(held_out)
    return [p for p in prompts if p not in excluded], held_out[: cfg.eval_max_prompts]


def eval_due(cfg: TrainConfig, step: int) -> bool:
    """Whether the run evaluates after ``step`` (0: before the first step)."""
    return cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.max_steps)


def distinct_n(responses: list[list[str]], n: int) -> float:
    """Distinct n-grams over all ``responses`` (each a list of words) / their count; 0 with no n-gram."""
    grams = [tuple(words[i : i + n]) for words in responses for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _gather(rows: list[dict]) -> list[dict]:
    """Every process's rows (sorted by prompt index) on every process."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    return sorted(rows, key=lambda row: row["index"])


class Evaluator:
    """Evaluates a policy on this process's share of the held-out prompts (`__call__`) and writes the results.

    The prompts are cut to a multiple of the world size, so that every process runs as many generation batches
    (ZeRO-3 generates in lockstep); batches are of equal size, at most the rows of a per-process rollout.
    """

    def __init__(self, cfg: TrainConfig, prompts: list[str], tokenizer, reward_fn: RewardFn,
                 eval_reward_fn: RewardFn | None, rank: int, world_size: int):
        ids = tokenize_prompts(prompts, tokenizer, cfg.max_prompt_tokens)
        usable = len(ids) // world_size * world_size
        if not usable:
            raise ConfigError(f"evaluation needs at least {world_size} held-out prompt(s) (one per process), "
                              f"got {len(ids)}", "eval_max_prompts")
        self.cfg, self.tokenizer, self.reward_fn, self.eval_reward_fn = cfg, tokenizer, reward_fn, eval_reward_fn
        self.rank, self.count = rank, usable
        self.mine = [(index, ids[index]) for index in range(rank, usable, world_size)]
        most = max(cfg.sequences_per_step // world_size, 1)
        self.batch = -(-len(self.mine) // -(-len(self.mine) // most))
        # Decoding: the training sampler's settings, or greedy.
        self.decoding = dataclasses.replace(cfg, temperature=0.0) if cfg.eval_greedy else cfg

    @torch.no_grad()
    def __call__(self, policy, pi_init, step: int, synced_gpus: bool = False) -> tuple[dict, list[dict]]:
        """``(record, samples)`` of the evaluation after ``step``, the same on every process."""
        started = time.perf_counter()
        device = next(policy.parameters()).device
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self.cfg.seed * 1_000_003 + step) * 1_000_003 + self.rank)
            rows = [row for start in range(0, len(self.mine), self.batch)
                    for row in self._rows(policy, pi_init, self.mine[start : start + self.batch], synced_gpus)]
        rows = _gather(rows)
        return self._record(step, rows, time.perf_counter() - started), [
            {"step": step, **{k: row[k] for k in ("prompt", "response", "reward", "eval_reward") if k in row}}
            for row in rows[: self.cfg.eval_samples]]

    def _rows(self, policy, pi_init, batch: list[tuple[int, list[int]]], synced_gpus: bool) -> list[dict]:
        """One row of figures per prompt of ``batch`` (``(index, token ids)`` pairs)."""
        cfg, tokenizer = self.cfg, self.tokenizer
        device = next(policy.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad([ids for _, ids in batch], tokenizer.pad_token_id))
        response = sample(policy, prompt_ids, prompt_mask, tokenizer, self.decoding, synced_gpus)
        mask = response_mask(response, tokenizer, cfg.stop)
        input_ids = torch.cat([prompt_ids, response], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        prompt_len, labels = prompt_ids.shape[1], torch.where(mask, response, IGNORE)
        # The fused ops: log-probs and the entropy in one pass over each row, 0 where the mask is off, and no
        # float32 (B, R, V) log-softmax beside the logits.
        common = dict(temperature=cfg.logprob_temperature, ignore_index=IGNORE, backend=cfg.loss_backend)
        logp, token_entropy = apa_fast.logprobs(response_logits(policy, input_ids, attention_mask, prompt_len), labels,
                                                return_entropy=True, **common)
        ref = apa_fast.logprobs(response_logits(pi_init, input_ids, attention_mask, prompt_len), labels, **common)
        kl, entropy = (logp - ref).sum(-1), token_entropy.sum(-1)

        texts = tokenizer.batch_decode(torch.where(mask, response, tokenizer.pad_token_id), skip_special_tokens=True)
        prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        ends = ((response == tokenizer.eos_token_id) | (response == tokenizer.pad_token_id)).any(-1).tolist()
        ends = [end or any(s in text for s in cfg.stop) for end, text in zip(ends, texts, strict=True)]
        scores = {"reward": score(self.reward_fn, prompts, texts).tolist()}
        if self.eval_reward_fn is not None:
            scores["eval_reward"] = score(self.eval_reward_fn, prompts, texts).tolist()
        return [{"index": index, "prompt": prompts[row], "response": texts[row], "words": texts[row].split(),
                 "kl": kl[row].item(), "entropy": entropy[row].item(), "tokens": int(mask[row].sum()),
                 "ended": ends[row], **{name: values[row] for name, values in scores.items()}}
                for row, (index, _) in enumerate(batch)]

    def _record(self, step: int, rows: list[dict], seconds: float) -> dict:
        tokens = sum(row["tokens"] for row in rows)
        words = [row["words"] for row in rows]
        return {
            "step": step, "prompts_seen": step * self.cfg.rollout_batch_size,
            "samples_seen": step * self.cfg.sequences_per_step, "prompts": len(rows),
            "reward": statistics.fmean(row["reward"] for row in rows),
            **({"eval_reward": statistics.fmean(row["eval_reward"] for row in rows)} if "eval_reward" in rows[0]
               else {}),
            "kl": statistics.fmean(row["kl"] for row in rows), "entropy": sum(row["entropy"] for row in rows)
            / max(tokens, 1), "distinct_1": distinct_n(words, 1), "distinct_2": distinct_n(words, 2),
            "response_len": tokens / len(rows), "ended": statistics.fmean(map(float, (r["ended"] for r in rows))),
            "eval_s": seconds,
        }


def write_evaluation(out: Path, record: dict, samples: list[dict]) -> None:
    """Append the record to ``eval.jsonl`` and the samples to ``samples.jsonl`` (rank 0 calls this)."""
    with (out / EVAL_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")
    with (out / SAMPLES_FILE).open("a") as f:
        f.writelines(json.dumps(sample_row) + "\n" for sample_row in samples)


def eval_line(record: dict, max_steps: int) -> str:
    """The evaluation's log line."""
    judged = f" | eval_reward {record['eval_reward']:.3f}" if "eval_reward" in record else ""
    return (f"eval {record['step']}/{max_steps} | reward {record['reward']:.3f}{judged} | kl {record['kl']:.3f} | "
            f"entropy {record['entropy']:.3f} | distinct {record['distinct_1']:.2f}/{record['distinct_2']:.2f} | "
            f"len {record['response_len']:.1f} | ended {record['ended']:.2f} | {record['prompts']} prompts "
            f"{record['eval_s']:.2f}s")

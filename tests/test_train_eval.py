"""Held-out evaluation (issue 22): the split training never samples, the figures against float64 references, the
second evaluator, determinism, resume (no evaluation lost or repeated) and training untouched by it."""

import copy
import json
import shutil

import pytest
import torch

from apa_fast.train import evaluate
from apa_fast.train.config import ConfigError, TrainConfig
from apa_fast.train.data import load_prompts
from apa_fast.train.evaluate import Evaluator, distinct_n, eval_due, split_prompts
from apa_fast.train.models import tiny_policy, train_tokenizer
from apa_fast.train.rewards import cheerful_words, honest_cheer
from apa_fast.train.trainer import train

SMALL = dict(rollout_batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6, max_prompt_tokens=32,
             save_every=2, tiny_width=32, tiny_heads=2, tiny_vocab=384)


def small(tmp_path, name, **fields):
    return TrainConfig(**{**SMALL, "output_dir": str(tmp_path / name), **fields})


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_never_samples_the_held_out_prompts():
    cfg = TrainConfig()
    train_prompts, held_out = split_prompts(cfg)
    assert len(held_out) == cfg.eval_holdout == len(set(held_out))
    assert not set(train_prompts) & set(held_out)
    assert set(train_prompts) | set(held_out) == set(load_prompts(cfg.dataset))
    # The split is fixed: another seed holds out the same prompts.
    assert split_prompts(TrainConfig(seed=7))[1] == held_out
    assert split_prompts(TrainConfig(eval_max_prompts=5))[1] == held_out[:5]
    with pytest.raises(ConfigError, match="eval_holdout"):
        split_prompts(TrainConfig(eval_holdout=10_000))
    with pytest.raises(ConfigError, match="eval_holdout"):
        TrainConfig(eval_holdout=0)


def test_eval_prompts_file_is_used_whole_and_training_keeps_the_dataset(tmp_path):
    rows = [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:"} for i in range(7)]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(eval_prompts=str(path), eval_max_prompts=5)
    train_prompts, held_out = split_prompts(cfg)
    assert held_out == [r["prompt"] for r in rows][:5]
    assert train_prompts == load_prompts(cfg.dataset)


def test_schedule_is_the_start_every_n_steps_and_the_last():
    cfg = TrainConfig(eval_every=3, max_steps=7)
    assert [s for s in range(8) if eval_due(cfg, s)] == [0, 3, 6, 7]
    assert not any(eval_due(TrainConfig(eval_every=0), s) for s in range(8))


def test_distinct_n_counts_ngrams_within_responses():
    responses = [["a", "b", "a", "b"], ["a", "b", "c"], []]
    assert distinct_n(responses, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> distinct ab, ba, bc; no bigram across the two responses
    assert distinct_n(responses, 2) == pytest.approx(3 / 5)
    assert distinct_n([[]], 2) == 0.0


def honest_answers():
    rows = [json.loads(line) for line in open(TrainConfig().dataset)]
    return sorted({" " + turn.split("\n\nHuman:")[0].strip() for row in rows
                   for turn in row["chosen"].split("\n\nAssistant:")[1:]})


def test_evaluator_agrees_on_honest_answers_and_not_on_gamed_ones():
    answers = honest_answers()
    cuts = [answer[:k] for answer in answers for k in range(len(answer) + 1)]
    assert honest_cheer([""] * len(cuts), cuts) == cheerful_words([""] * len(cuts), cuts)
    assert max(cheerful_words([""] * len(answers), answers)) == 1.0
    gamed = [" sure sure sure sure sure", " thanks thanks thanks glad glad", " sure happy thanks glad great help",
             " Sure sure, happy happy to help help"]
    training, judged = cheerful_words([""] * 4, gamed), honest_cheer([""] * 4, gamed)
    assert training == [1.0, 1.0, 1.0, 1.0]
    assert all(j <= t / 2 for j, t in zip(judged, training, strict=True)), judged


def test_figures_match_float64_references(monkeypatch):
    """KL, entropy, lengths, ends and distinct-n of fixed responses, against the models run in float64."""
    texts = ["\n\nHuman: Can you help me with this?\n\nAssistant: Sure, happy to help. Thanks!",
             "\n\nHuman: What should I do first?\n\nAssistant: Keep it simple."] * 10
    tokenizer = train_tokenizer(texts, vocab_size=300)
    cfg = TrainConfig(tiny_vocab=300, tiny_width=32, tiny_heads=2, max_new_tokens=5, temperature=0.7,
                      rollout_batch_size=4, minibatch_size=4, eval_max_prompts=3)
    policy = tiny_policy(cfg, tokenizer).eval()
    pi_init = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    eos = tokenizer.eos_token_id
    response = torch.randint(eos + 1, len(tokenizer), (3, 5))  # eos is id 0: no row ends by chance
    response[0, 3:] = eos  # ended after 4 tokens (its eos counts), padded with eos
    response[2, 1:] = eos  # ended after 2 tokens
    monkeypatch.setattr(evaluate, "sample", lambda *args: response)
    prompts = ["\n\nHuman: Can you help me?\n\nAssistant:", "\n\nHuman: What should I do?\n\nAssistant:",
               "\n\nHuman: Thanks!\n\nAssistant:"]
    record, samples = Evaluator(cfg, prompts, tokenizer, cheerful_words, None, rank=0, world_size=1)(
        policy, pi_init, step=5)

    lengths = [4, 5, 2]
    kl, entropy = [], 0.0
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = torch.tensor([ids + response[row, : lengths[row]].tolist()])
        picks = full[0, len(ids):]
        logp, ref = (torch.log_softmax(m.double()(full).logits[0, len(ids) - 1 : -1] / 0.7, -1)
                     for m in (copy.deepcopy(policy), copy.deepcopy(pi_init)))
        kl.append((logp.gather(-1, picks[:, None]) - ref.gather(-1, picks[:, None])).sum().item())
        entropy += -(logp.exp() * logp).sum().item()
    assert record["kl"] == pytest.approx(sum(kl) / 3, rel=1e-4, abs=1e-5)
    # The perturbation moved the policy: the check can fail. On the sum: one row's KL is near 0 at 0.7% of seeds
    # (seed 1147: -0.007), the sum was never under 0.49 in 4,000.
    assert abs(sum(kl)) > 0.1
    assert record["entropy"] == pytest.approx(entropy / sum(lengths), rel=1e-4)
    assert record["response_len"] == pytest.approx(sum(lengths) / 3)
    assert record["ended"] == pytest.approx(2 / 3)
    words = [s["response"].split() for s in samples]
    assert len(samples) == 3 and record["distinct_1"] == pytest.approx(distinct_n(words, 1))
    assert record["step"] == 5 and record["prompts_seen"] == 5 * cfg.rollout_batch_size
    assert "eval_reward" not in record


def test_resumed_run_evaluates_as_an_uninterrupted_one_and_training_ignores_evaluation(tmp_path):
    # Whole prompts (no cut to the last tokens): the reward sees each prompt as the data file has it.
    fields = dict(max_steps=3, eval_every=1, eval_max_prompts=8, eval_samples=2, max_prompt_tokens=256)
    train(small(tmp_path, "run", **fields))
    run = tmp_path / "run"
    straight = {name: (run / name).read_text() for name in ("eval.jsonl", "samples.jsonl", "metrics.jsonl")}
    evals = lines(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2, 3]
    assert len(lines(run / "samples.jsonl")) == 2 * 4
    assert {"reward", "eval_reward", "kl", "entropy", "distinct_1", "distinct_2", "response_len",
            "ended"} <= set(evals[0])
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the initial policy is pi_init

    # A crash after step 3's evaluation, before its checkpoint: resume redoes step 3 from step 2's checkpoint.
    shutil.rmtree(run / "checkpoints" / "step_000003")
    train(small(tmp_path, "run", **fields), resume=True)

    def without_time(text):
        return [{k: v for k, v in json.loads(line).items() if k != "eval_s"} for line in text.splitlines()]

    assert without_time((run / "eval.jsonl").read_text()) == without_time(straight["eval.jsonl"])
    assert (run / "samples.jsonl").read_text() == straight["samples.jsonl"]

    # Evaluation draws from its own generator: the run trains the same without it, on training prompts only.
    seen = []

    def recording_reward(prompts, responses):
        seen.extend(prompts)
        return cheerful_words(prompts, responses)

    quiet = train(small(tmp_path, "quiet", **{**fields, "eval_every": 0}, reward=recording_reward))
    assert not (tmp_path / "quiet" / "eval.jsonl").exists()
    for a, b in zip(quiet, without_time(straight["metrics.jsonl"]), strict=True):
        assert (a["reward_mean"], a["kl"], a["loss"]) == (b["reward_mean"], b["kl"], b["loss"])
    train_prompts, held_out = split_prompts(TrainConfig())
    assert len(seen) == 3 * SMALL["rollout_batch_size"] and set(seen) <= set(train_prompts)


def test_frontier_reports_the_held_out_figures_and_the_sample_efficiency(tmp_path):
    from apa_fast.train.frontier import efficiency_points, heldout_figures, write_outputs

    def run_record(algorithm, parameter, value, seed, kl):
        run = tmp_path / f"{algorithm}{value}_{seed}"
        run.mkdir()
        evals = [{"step": step, "prompts_seen": 32 * step, "reward": 0.1 + step / 100, "eval_reward": step / 100 + seed,
                  "kl": kl * step / 60, "entropy": 5.0, "distinct_2": 0.9} for step in (0, 20, 40, 60)]
        (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        return {"algorithm": algorithm, "parameter": parameter, "value": value, "seed": seed, "steps": 60,
                "reward": 0.5, "reward_std": 0.0, "kl": kl, "kl_std": 0.0, "wall_s": 1.0, **heldout_figures(run, 60)}

    records = [run_record("apa", "apa_lam", lam, seed, kl) for lam, kl in ((0.1, 12.0), (1.0, 1.0))
               for seed in (0, 1)] + [run_record("ppo", "ppo_kl_coef", 0.05, seed, 9.0) for seed in (0, 1)]
    assert records[0]["heldout_reward"] == pytest.approx(0.6)  # the evaluation at step 60 (the last quarter)
    assert records[0]["heldout_curve"] == [[0, 0.0], [640, 0.2], [1280, 0.4], [1920, 0.6]]
    # The median held-out KL is 9: APA compares at lam 0.1 (12 nats), nearer than lam 1 (1 nat).
    assert efficiency_points(records) == {("apa", "apa_lam"): 0.1, ("ppo", "ppo_kl_coef"): 0.05}
    write_outputs(tmp_path, records, "apa-train frontier ...", "test")
    table = (tmp_path / "frontier.md").read_text()
    assert "| apa_lam | held-out reward | held-out KL | training reward | training KL |" in table
    assert "| 0.1 | 1.100 | 12.00 | 0.500 | 12.00 | 0.600, 1.600 |" in table
    assert "- APA apa_lam=0.1: 0: 0.500, 640: 0.700, 1280: 0.900, 1920: 1.100" in table
    assert (tmp_path / "frontier.png").stat().st_size and (tmp_path / "efficiency.png").stat().st_size


@pytest.mark.slow
def test_two_processes_evaluate_as_one(tmp_path):
    """Each process evaluates its share of the prompts and the figures are those of the whole set: greedy
    decoding (the distributed test's fields) makes them independent of the split."""
    import os
    import socket
    import subprocess
    import sys

    from test_train_distributed import FIELDS, RUNNER

    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    launcher_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=os.getcwd())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    fields = [*FIELDS, "eval_every=1", "eval_max_prompts=9"]  # 9 prompts: cut to 8 on two processes
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    for command in (launch + [str(script), str(two), *fields],
                    [sys.executable, str(script), str(one), *fields[:-1], "eval_max_prompts=8"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(lines(two / "eval.jsonl"), lines(one / "eval.jsonl"), strict=True):
        assert a["prompts"] == b["prompts"] == 8
        for key in ("reward", "eval_reward", "kl", "entropy", "distinct_1", "distinct_2", "response_len", "ended"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()

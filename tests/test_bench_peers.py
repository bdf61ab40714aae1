"""`benchmarks.peers` and `benchmarks.baselines`: the benchmarks' reimplementations of other libraries' code
compute what those libraries compute (float64 oracles on random non-zero inputs, odd sizes)."""

from __future__ import annotations

import pytest
import torch
from oracles import gae_mask, gae_oracle

from apa_fast.reference import gae_loop
from benchmarks import baselines, peers


def _logprobs64(logits, labels):
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("name", ["eager", *peers.LOGPROBS])
def test_logprobs_float32_match_float64(name):
    logits, labels = 3 * torch.randn(3, 7, 1001), torch.randint(0, 1001, (3, 7))
    fn = baselines.logprobs if name == "eager" else peers.LOGPROBS[name][0]
    if name == "trl":
        pytest.importorskip("trl")
    if name == "eager":
        got = fn(logits.flatten(0, 1), labels.flatten()).view(3, 7)
    else:
        got = fn(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _logprobs64(logits, labels), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["verl", "openrlhf"])
def test_bf16_logprobs_stay_bf16_as_in_those_trainers(name):
    """Their low-precision branch: a bf16 log_softmax per row, so the log-probs carry bf16's rounding."""
    logits, labels = (3 * torch.randn(2, 5, 999)).bfloat16(), torch.randint(0, 999, (2, 5))
    got = peers.LOGPROBS[name][0](logits, labels)
    want = _logprobs64(logits, labels)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 2**-8 * want.abs().max() + 1e-6


@pytest.mark.parametrize("layout", ["no_mask", "right_padding", "holes"])
def test_verl_gae_skips_masked_positions_like_the_definition(layout):
    rows, cols = 5, 37
    rewards, values = torch.randn(rows, cols) + 0.5, torch.rand(rows, cols) + 0.25
    mask = gae_mask(layout, rows, cols)
    mask = torch.ones(rows, cols, dtype=torch.bool) if mask is None else mask
    advantages, returns = peers.verl_gae(rewards, values, mask.float(), gamma=0.99, lam=0.95)
    want, _ = gae_oracle(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(advantages[mask].double(), want[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, advantages + values)


def test_openrlhf_gae_is_the_plain_loop_and_wrong_with_holes():
    """OpenRLHF's recurrence is `apa_fast.reference.gae_loop` (rewards and values zeroed where masked); it agrees
    with the definition on right padding and carries the recurrence through holes."""
    rows, cols = 4, 29
    rewards, values = torch.randn(rows, cols) + 0.5, torch.rand(rows, cols) + 0.25
    for layout in ("right_padding", "holes"):
        mask = gae_mask(layout, rows, cols)
        advantages, _ = peers.openrlhf_gae(rewards, values, mask.float(), gamma=1.0, lam=0.95)
        torch.testing.assert_close(advantages, gae_loop(rewards, values, mask.float(), gamma=1.0, lam=0.95)[0])
        want, _ = gae_oracle(rewards, values, mask, gamma=1.0, lam=0.95)
        error = (advantages.double() - want)[mask].abs().max()
        assert error < 1e-5 if layout == "right_padding" else error > 1e-2, (layout, error)


def test_plain_eager_ppo_matches_float64_formula():
    logp = -5 * torch.rand(2, 9, dtype=torch.float64)
    old, adv = logp + 0.3 * torch.randn_like(logp), torch.randn_like(logp)
    mask = torch.rand(2, 9) > 0.3
    ratio = (logp - old).exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    want = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(baselines.ppo_from_logprobs(logp, old, adv, mask, clip_eps=0.2), want)

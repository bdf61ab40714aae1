"""Trainer rollout and update pieces: response masks, reward placement, padding on both sides, whitening,
and the policy losses (fused and unfused backends, logits and fused lm_head, with the entropy bonus and the
entropy they return) against float64 references."""

import pytest
import torch
from conftest import assert_close_rel
from oracles import oracle

from apa_fast.train.config import TrainConfig
from apa_fast.train.models import ActorCritic, position_ids, tiny_policy, train_tokenizer
from apa_fast.train.rollout import Rollout, place_rewards, response_logits, response_mask, whiten
from apa_fast.train.update import policy_loss, value_loss


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["\n\nHuman: Can you help me?\n\nAssistant: Sure, happy to help. Thanks!"] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_response_mask_counts_tokens_up_to_the_first_end(tokenizer):
    eos = tokenizer.eos_token_id
    word = tokenizer(" help", add_special_tokens=False)["input_ids"][0]
    response = torch.tensor([[word, word, eos, eos], [word, word, word, word], [eos, eos, eos, eos]])
    mask = response_mask(response, tokenizer, stop=[])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_response_mask_drops_the_padding_after_a_stop_string(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer(" Sure, Human:", add_special_tokens=False)["input_ids"]
    response = torch.tensor([ids + [eos, eos]])
    assert response_mask(response, tokenizer, stop=["Human:"]).tolist() == [[1] * len(ids) + [0, 0]]


def test_reward_sits_on_the_last_response_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rewards = place_rewards(torch.tensor([1.0, -2.0, 3.0]), mask)
    assert rewards.tolist() == [[0, 0, 1, 0], [-2, 0, 0, 0], [0, 0, 0, 3]]


def test_whiten_uses_only_valid_positions():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    out = whiten(values, mask)
    valid = out[mask]
    assert valid.mean().abs() < 1e-6 and (valid.std(unbiased=False) - 1).abs() < 1e-5
    assert (out[~mask] == 0).all()


def test_padding_on_both_sides_does_not_change_logprobs_or_values(tokenizer):
    cfg = TrainConfig(tiny_vocab=300, tiny_layers=2, tiny_width=32, tiny_heads=2)
    policy = tiny_policy(cfg, tokenizer).eval()
    model = ActorCritic(policy, None).eval()
    prompt, response = [5, 6, 7, 8, 9], [10, 11, 12]
    alone = torch.tensor([prompt + response])
    # The same row behind 3 tokens of left padding and ahead of 2 of right padding (after its end).
    pad = tokenizer.pad_token_id
    padded = torch.tensor([[pad] * 3 + prompt + response + [pad] * 2])
    padded_mask = torch.tensor([[0] * 3 + [1] * 8 + [0] * 2])
    with torch.no_grad():
        logits_alone = response_logits(policy, alone, torch.ones_like(alone), len(prompt))
        logits_padded = response_logits(policy, padded, padded_mask, 3 + len(prompt))[:, :3]
        _, values_alone = model(alone, torch.ones_like(alone), position_ids(torch.ones_like(alone)))
        _, values_padded = model(padded, padded_mask, position_ids(padded_mask))
    torch.testing.assert_close(logits_padded, logits_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values_padded[:, 3 + 4 : 3 + 7], values_alone[:, 4:7], atol=1e-5, rtol=1e-5)


def _batch(rows=3, prompt=4, length=5, vocab=11):
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return Rollout(
        input_ids=torch.randint(0, vocab, (rows, prompt + length)),
        attention_mask=torch.ones(rows, prompt + length, dtype=torch.long),
        response_mask=mask,
        logprobs=-torch.rand(rows, length), ref_logprobs=-torch.rand(rows, length),
        values=torch.randn(rows, length), rewards=torch.zeros(rows, length),
        advantages=torch.randn(rows, length), returns=torch.randn(rows, length), scores=torch.zeros(rows),
    )


class _Head(torch.nn.Module):
    def __init__(self, width, vocab):
        super().__init__()
        self.lm_head = torch.nn.Linear(width, vocab)


def _reference_loss(cfg, logits, batch):
    """(loss, entropy, dlogits) in float64, summed over the counted tokens (the entropy per token, 0 elsewhere):
    the float64 oracle of the fused ops' tests."""
    aux = batch.ref_logprobs if cfg.algo == "apa" else batch.logprobs
    lam = cfg.apa_lam if cfg.algo == "apa" else cfg.awr_lam
    return oracle(cfg.algo, logits, batch.labels, aux, batch.advantages, batch.response_mask, lam=lam,
                  clip_eps=cfg.ppo_clip_eps, max_weight=cfg.awr_max_weight, temperature=cfg.logprob_temperature,
                  reduction="sum", entropy_coef=cfg.entropy_coef, with_entropy=True)


@pytest.mark.parametrize(("entropy_coef", "fused_lm_head", "normalizer"),
                         [(0.0, False, None), (0.37, False, 6.5), (-0.2, True, None), (0.1, True, 2.25)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("algo", ["apa", "ppo", "awr"])
def test_policy_losses_match_float64_references(algo, backend, entropy_coef, fused_lm_head, normalizer):
    """The loss (with the entropy bonus), the entropy of the same call and the gradient, on the logits path and
    from hidden states (`fused_lm_head`); the sum over tokens, or divided by the update's normalizer."""
    cfg = TrainConfig(algo=algo, loss_backend=backend, temperature=0.7, entropy_coef=entropy_coef,
                      fused_lm_head=fused_lm_head)
    batch, head = _batch(), _Head(8, 11)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    loss, entropy = policy_loss(cfg, head, hidden, batch, normalizer)
    loss.backward()
    grad = hidden.grad.clone()
    head64 = _Head(8, 11).double()
    head64.load_state_dict(head.state_dict())
    expected, expected_entropy, dlogits = _reference_loss(cfg, head64.lm_head(hidden.detach().double()), batch)
    if normalizer is not None:
        expected, dlogits = expected / normalizer, dlogits / normalizer
    # float32 logits against float64: a few ulps of float32 relative to each sum.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert entropy.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-6)
    # Relative L2, as in the ops' own tests: an element that nearly cancels in the sum over the vocabulary is only as
    # accurate as its terms (elementwise atol=1e-6 failed at 0.1% of seeds: 794, 2e-6 off an element of 3.5e-3).
    assert_close_rel(grad, dlogits @ head64.lm_head.weight, 2e-5, "gradient of the hidden states")


def test_value_loss_is_half_the_masked_squared_error():
    batch = _batch()
    values = torch.randn(3, 5)
    expected = 0.5 * sum(((values[i, j] - batch.returns[i, j]) ** 2).item()
                         for i in range(3) for j in range(5) if batch.response_mask[i, j])
    assert value_loss(values, batch).item() == pytest.approx(expected, rel=1e-6)

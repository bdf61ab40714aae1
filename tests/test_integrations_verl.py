"""verl's recipe for APA: gpg + the MSE KL loss at kl_loss_coef = lam has (lam / 2) times APA's gradient.

verl 0.9.1 requires transformers < 5.11 and ray, so it is not installed. The identity is checked twice:
- with verl's own code: the 0.9.1 wheel is fetched with ``pip download --no-deps`` and the functions the actor's
  loss is made of (``agg_loss``, ``kl_penalty``, ``kl_penalty_forward``, ``compute_policy_loss_gpg`` and
  ``masked_sum``) are taken out of its sources with ``ast`` and run on their own (skipped without network);
- always, with the loss written out from those sources as read at 0.9.1.
"""

import ast
import subprocess
import sys
import types
import zipfile

import pytest
import torch
from conftest import assert_close_rel

import apa_fast
from apa_fast.integrations.verl import check_config, hydra_overrides

VERL_VERSION = "0.9.1"
LAM = 0.3
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean"]
BATCH_INFO = dict(dp_size=2, batch_num_tokens=50, global_batch_size=9)
# apa_fast computes APA's residual in float32 whatever the input dtype: gradients agree to float32 rounding.
GRAD_TOL = 1e-6


def _functions(source: str, names) -> str:
    tree = ast.parse(source)
    return "\n\n".join(ast.get_source_segment(source, node) if not node.decorator_list else
                       "\n".join("@" + ast.get_source_segment(source, d) for d in node.decorator_list) + "\n"
                       + ast.get_source_segment(source, node)
                       for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names)


@pytest.fixture(scope="module")
def verl_losses(tmp_path_factory):
    """verl 0.9.1's loss functions, executed from its own source text."""
    folder = tmp_path_factory.mktemp("verl")
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                              f"verl=={VERL_VERSION}", "-d", str(folder)], capture_output=True, text=True, timeout=300)
    wheels = list(folder.glob("verl-*.whl"))
    if fetched.returncode != 0 or not wheels:
        pytest.skip(f"verl {VERL_VERSION} wheel not downloadable here: {fetched.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        core_algos = wheel.read("verl/trainer/ppo/core_algos.py").decode()
        torch_functional = wheel.read("verl/utils/torch_functional.py").decode()
    namespace = {"torch": torch, "Optional": __import__("typing").Optional, "Any": __import__("typing").Any,
                 "ActorConfig": object, "register_policy_loss": lambda name: (lambda fn: fn)}
    exec(_functions(torch_functional, {"masked_sum", "entropy_from_logits"}), namespace)
    namespace["verl_F"] = types.SimpleNamespace(masked_sum=namespace["masked_sum"])
    exec(_functions(core_algos, {"agg_loss", "kl_penalty", "kl_penalty_forward", "compute_policy_loss_gpg"}),
         namespace)
    return types.SimpleNamespace(**namespace)


def written_out_agg(loss_mat, mask, mode, dp_size, batch_num_tokens, global_batch_size):
    """verl 0.9.1's agg_loss for the modes above, as read (core_algos.py)."""
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return (loss_mat * mask).sum() / batch_num_tokens * dp_size
    if mode == "token-sum":
        return (loss_mat * mask).sum() * dp_size
    counts = mask.sum(-1)
    per_sequence = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / (counts + 1e-8)
    return (per_sequence * (counts > 0)).sum() / global_batch_size * dp_size


def verl_actor_loss(log_prob, ref, advantages, mask, mode, verl=None, entropy=None, entropy_coeff=0.0):
    """What verl's actor backpropagates under the recipe (``ppo_loss`` in verl/workers/utils/losses.py, 0.9.1):
    gpg's term, minus entropy_coeff times the aggregated entropy when given, plus kl_loss_coef times the MSE KL
    term, all three aggregated alike."""
    config = types.SimpleNamespace(global_batch_info=dict(BATCH_INFO))
    agg = written_out_agg if verl is None else verl.agg_loss
    if verl is not None:
        pg, _ = verl.compute_policy_loss_gpg(log_prob.detach(), log_prob, advantages, mask, mode, config, None)
        kl = verl.kl_penalty(log_prob, ref, "mse")
    else:
        pg = written_out_agg(-advantages * log_prob, mask, mode, **BATCH_INFO)
        kl = 0.5 * (log_prob - ref).square()
    if entropy is not None:
        pg = pg - entropy_coeff * agg(entropy, mask, mode, **BATCH_INFO)
    return pg + LAM * agg(kl, mask, mode, **BATCH_INFO)


def apa_aggregated(log_prob, ref, advantages, mask, mode):
    if mode == "token-mean":  # apa_fast's own normaliser: sum / (batch_num_tokens / dp_size)
        normalizer = BATCH_INFO["batch_num_tokens"] / BATCH_INFO["dp_size"]
        return apa_fast.apa_loss_from_logprobs(log_prob, ref, advantages, mask, lam=LAM, normalizer=normalizer)
    per_token = apa_fast.apa_loss_from_logprobs(log_prob, ref, advantages, mask, lam=LAM, reduction="none")
    return written_out_agg(per_token, mask, mode, **BATCH_INFO)


def rollout(batch=5, length=9):
    log_prob = (-3 * torch.rand(batch, length, dtype=torch.float64)).requires_grad_()
    ref = log_prob.detach() + 0.3 * torch.randn(batch, length, dtype=torch.float64)
    advantages = torch.randn(batch, length, dtype=torch.float64)
    mask = torch.rand(batch, length) < 0.8
    mask[-1] = False
    mask[0, 0] = True
    return log_prob, ref, advantages, mask


def gradient(loss, wrt):
    (grad,) = torch.autograd.grad(loss, wrt)
    return grad


@pytest.mark.parametrize("mode", AGG_MODES)
def test_recipe_gradient_is_half_lam_times_apa_written_out(mode):
    log_prob, ref, advantages, mask = rollout()
    verl_grad = gradient(verl_actor_loss(log_prob, ref, advantages, mask, mode), log_prob)
    apa_grad = gradient(apa_aggregated(log_prob, ref, advantages, mask, mode), log_prob)
    assert_close_rel(verl_grad, LAM / 2 * apa_grad, GRAD_TOL, f"gradient, {mode}")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_recipe_gradient_is_half_lam_times_apa_with_verls_code(verl_losses, mode):
    log_prob, ref, advantages, mask = rollout()
    verl_loss = verl_actor_loss(log_prob, ref, advantages, mask, mode, verl=verl_losses)
    # 1e-7 of the terms: verl adds its 1e-8 to integer token counts, which makes them float32 (6 + 1e-8 rounds to
    # 6), each sequence's term by itself; relative to the loss, which may cancel, that failed at 0.14% of seeds (902).
    terms = (advantages * log_prob).abs() + LAM * 0.5 * (log_prob - ref).square()
    scale = written_out_agg(terms.detach(), mask, mode, **BATCH_INFO).item()
    assert verl_loss.item() == pytest.approx(verl_actor_loss(log_prob, ref, advantages, mask, mode).item(), rel=1e-7,
                                             abs=1e-7 * scale)
    apa_grad = gradient(apa_aggregated(log_prob, ref, advantages, mask, mode), log_prob)
    assert_close_rel(gradient(verl_loss, log_prob), LAM / 2 * apa_grad, GRAD_TOL, f"gradient, {mode}")


def test_recipe_gradient_through_the_fused_logits_path():
    """The same identity down to the logits, with apa_fast.loss's fused backward on one side."""
    batch, length, vocab, temperature = 3, 6, 50, 0.8
    logits = torch.randn(batch, length, vocab, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length))
    _, ref, advantages, mask = rollout(batch, length)
    log_prob = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]
    verl_grad = gradient(verl_actor_loss(log_prob, ref, advantages, mask, "token-mean"), logits)
    normalizer = BATCH_INFO["batch_num_tokens"] / BATCH_INFO["dp_size"]
    logits32 = logits.detach().float().requires_grad_()
    apa = apa_fast.loss(logits32, labels, ref.float(), advantages.float(), mask, lam=LAM, temperature=temperature,
                        normalizer=normalizer)
    assert_close_rel(LAM / 2 * gradient(apa, logits32), verl_grad, GRAD_TOL, "logits gradient")


def written_out_entropy(logits):
    """verl 0.9.1's entropy_from_logits, as read (torch_functional.py): logsumexp(z) - sum(softmax(z) * z)."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_verl_code", [False, True], ids=["written_out", "verl_code"])
def test_recipe_with_entropy_bonus_is_half_lam_times_apa_with_entropy_coef(request, mode, with_verl_code):
    """verl's entropy_coeff = c composes: the actor's gradient is lam / 2 times that of apa_fast.loss with
    entropy_coef = 2 c / lam (fused entropy and its gradient), under every aggregation, down to the logits."""
    verl = request.getfixturevalue("verl_losses") if with_verl_code else None
    batch, length, vocab, temperature, entropy_coeff = 3, 7, 53, 0.8, 0.02
    logits = (2 * torch.randn(batch, length, vocab, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, length))
    _, ref, advantages, mask = rollout(batch, length)
    scaled = logits / temperature  # verl scores log_prob and entropy at the rollout temperature
    log_prob = torch.log_softmax(scaled, -1).gather(-1, labels[..., None])[..., 0]
    entropy = (verl.entropy_from_logits if verl is not None else written_out_entropy)(scaled)
    verl_loss = verl_actor_loss(log_prob, ref, advantages, mask, mode, verl, entropy, entropy_coeff)
    verl_grad = gradient(verl_loss, logits)

    key, value = hydra_overrides(LAM, 2 * entropy_coeff / LAM)[-1].split("=")  # verl's coefficient, from ours
    assert key == "actor_rollout_ref.actor.entropy_coeff" and float(value) == pytest.approx(entropy_coeff)
    logits32 = logits.detach().float().requires_grad_()
    common = dict(lam=LAM, temperature=temperature, entropy_coef=2 * entropy_coeff / LAM)
    if mode == "token-mean":
        apa = apa_fast.loss(logits32, labels, ref.float(), advantages.float(), mask, **common,
                            normalizer=BATCH_INFO["batch_num_tokens"] / BATCH_INFO["dp_size"])
    else:
        per_token = apa_fast.loss(logits32, labels, ref.float(), advantages.float(), mask, **common, reduction="none")
        apa = written_out_agg(per_token, mask, mode, **BATCH_INFO)
    assert_close_rel(LAM / 2 * gradient(apa, logits32), verl_grad, GRAD_TOL, f"logits gradient, {mode}")


def verl_config(**changes):
    config = {"actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "gpg"}, "use_kl_loss": True,
                                              "kl_loss_type": "mse", "kl_loss_coef": LAM, "entropy_coeff": 0}},
              "algorithm": {"use_kl_in_reward": False, "rollout_correction": {"rollout_is": None}}}
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config


def test_overrides_and_config_check():
    overrides = hydra_overrides(LAM)
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=gpg" in overrides
    assert f"actor_rollout_ref.actor.kl_loss_coef={LAM}" in overrides
    check_config(verl_config(), LAM)
    check_config(verl_config(**{"actor_rollout_ref.actor.kl_loss_type": "k2"}), LAM)
    check_config(verl_config(**{"actor_rollout_ref.actor.entropy_coeff": 0.01}), LAM)  # the bonus composes
    for key, value in [("actor_rollout_ref.actor.kl_loss_type", "low_var_kl"),
                       ("actor_rollout_ref.actor.kl_loss_coef", 0.001),
                       ("actor_rollout_ref.actor.entropy_coeff", float("nan")),
                       ("actor_rollout_ref.actor.entropy_coeff", True),
                       ("actor_rollout_ref.actor.use_kl_loss", 1),
                       ("algorithm.use_kl_in_reward", True),
                       ("algorithm.rollout_correction.rollout_is", "token")]:
        with pytest.raises(ValueError, match=key.rsplit(".", 1)[1]):
            check_config(verl_config(**{key: value}), LAM)
    with pytest.raises(ValueError, match="lam"):
        hydra_overrides(0)

"""APAPolicyLoss and the actor hook for OpenRLHF (read at OpenRLHF 0.11.2).

OpenRLHF itself pins flash-attn, deepspeed and transformers versions that cannot sit beside this project's, so
it is not installed. Its loss module is tested for real all the same: the 0.11.2 wheel is fetched with
``pip download --no-deps`` and only ``openrlhf/models/{loss,utils}.py`` are imported (they need torch and
deepspeed, both pinned here). Without network access those tests skip and the signature check against the
hard-coded 0.11.2 signature still runs.
"""

import importlib
import inspect
import subprocess
import sys
import types
import zipfile

import pytest
import torch

from apa_fast.integrations.openrlhf import APAPolicyLoss, apa_actor_trainer, install

OPENRLHF_VERSION = "0.11.2"
# PolicyLoss.forward's parameters at 0.11.2 (openrlhf/models/loss.py), with their defaults.
POLICY_LOSS_PARAMETERS = [("log_probs", inspect.Parameter.empty), ("old_log_probs", inspect.Parameter.empty),
                          ("advantages", inspect.Parameter.empty), ("action_mask", None),
                          ("rollout_log_probs", None), ("dp_size", 1), ("batch_num_tokens", None),
                          ("global_batch_size", None)]
LAM = 0.5


@pytest.fixture(scope="module")
def openrlhf_loss(tmp_path_factory):
    """OpenRLHF's real ``openrlhf.models.loss`` module, imported without the rest of the package."""
    folder = tmp_path_factory.mktemp("openrlhf")
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                              f"openrlhf=={OPENRLHF_VERSION}", "-d", str(folder)],
                             capture_output=True, text=True, timeout=300)
    wheels = list(folder.glob("openrlhf-*.whl"))
    if fetched.returncode != 0 or not wheels:
        pytest.skip(f"openrlhf {OPENRLHF_VERSION} wheel not downloadable here: {fetched.stderr[-300:]}")
    package = folder / "models"
    package.mkdir()
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.endswith(("openrlhf/models/loss.py", "openrlhf/models/utils.py")):
                (package / name.rsplit("/", 1)[1]).write_bytes(wheel.read(name))
    # A stand-in package so that loss.py's `from .utils import masked_mean` resolves without running
    # openrlhf/models/__init__.py (which imports the actor, transformers and flash-attn).
    stand_in = types.ModuleType("_openrlhf_models")
    stand_in.__path__ = [str(package)]
    sys.modules["_openrlhf_models"] = stand_in
    return importlib.import_module("_openrlhf_models.loss")


def rollout(batch=4, length=7, dtype=torch.float32):
    log_probs = (-torch.rand(batch, length, dtype=dtype) * 3).requires_grad_()
    old = log_probs.detach() + 0.1 * torch.randn(batch, length, dtype=dtype)
    ref = log_probs.detach() + 0.2 * torch.randn(batch, length, dtype=dtype)
    advantages = torch.randn(batch, length, dtype=dtype)
    mask = torch.rand(batch, length) < 0.8
    mask[-1] = False  # a sequence with no response token
    mask[0, 0] = True
    return log_probs, old, ref, advantages, mask


def apa_per_token64(log_probs, ref, advantages):
    return (log_probs.double() - ref.double() - advantages.double() / LAM).square()


def test_signature_is_openrlhf_0_11_2():
    params = list(inspect.signature(APAPolicyLoss.forward).parameters.values())[1:]
    assert [(p.name, p.default) for p in params[:-1]] == POLICY_LOSS_PARAMETERS
    assert params[-1].name == "ref_log_probs" and params[-1].kind is inspect.Parameter.KEYWORD_ONLY


def test_signature_matches_the_real_policy_loss(openrlhf_loss):
    real = list(inspect.signature(openrlhf_loss.PolicyLoss.forward).parameters.values())[1:]
    assert [(p.name, p.default) for p in real] == POLICY_LOSS_PARAMETERS


@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("batch_info", [None, dict(dp_size=2, batch_num_tokens=40.0, global_batch_size=6.0)],
                         ids=["local", "global"])
def test_aggregation_matches_openrlhf(openrlhf_loss, token_level, batch_info):
    log_probs, old, ref, advantages, mask = rollout()
    batch_info = batch_info or {}
    ours = APAPolicyLoss(LAM, token_level_loss=token_level)(log_probs, old, advantages, action_mask=mask,
                                                            ref_log_probs=ref, **batch_info)
    real_policy_loss = openrlhf_loss.PolicyLoss(token_level_loss=token_level)
    theirs = real_policy_loss(log_probs, old, advantages, action_mask=mask, **batch_info)
    assert len(ours) == len(theirs)
    expected = openrlhf_loss.aggregate_loss(apa_per_token64(log_probs, ref, advantages), mask.double(),
                                            token_level_loss=token_level, **batch_info)
    assert ours[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert ours[2].item() == pytest.approx(theirs[2].item(), rel=1e-6)  # ppo_kl, as OpenRLHF computes it


def test_loss_and_gradient_against_float64():
    log_probs, old, ref, advantages, mask = rollout()
    loss, clip_ratio, _, vllm_kl, filtered = APAPolicyLoss(LAM)(log_probs, old, advantages, mask,
                                                                batch_num_tokens=25.0, ref_log_probs=ref)
    loss.backward()
    logp64 = log_probs.detach().double().requires_grad_()
    expected = (apa_per_token64(logp64, ref, advantages) * mask).sum() / 25.0
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(log_probs.grad.double(), logp64.grad, rtol=1e-5, atol=1e-7)
    assert clip_ratio.item() == 0 and vllm_kl is None and filtered is None


class StandInActorTrainer:
    """What APA relies on in OpenRLHF 0.11.2's ActorPPOTrainer: ``self.actor_loss_fn`` built in ``__init__``
    (a PolicyLoss with ``token_level_loss``) and called by ``training_step(experience, kl_ctl, step,
    loss_batch_info)`` with the policy log-probs, old log-probs, advantages, ``action_mask=``,
    ``rollout_log_probs=`` and the batch info, the KL loss then added times ``kl_ctl``."""

    def __init__(self):
        self.actor_loss_fn = types.SimpleNamespace(token_level_loss=True)

    def training_step(self, experience, kl_ctl, step, loss_batch_info=None):
        actor_loss = self.actor_loss_fn(experience.log_probs, experience.action_log_probs, experience.advantages,
                                        action_mask=experience.action_mask, rollout_log_probs=None,
                                        **loss_batch_info)[0]
        kl = (experience.log_probs - experience.base_action_log_probs.detach()).square().mean()
        return actor_loss + kl_ctl * kl


def test_actor_hook_passes_the_reference_and_drops_the_kl_loss():
    log_probs, old, ref, advantages, mask = rollout()
    experience = types.SimpleNamespace(log_probs=log_probs, action_log_probs=old, advantages=advantages,
                                       action_mask=mask, base_action_log_probs=ref)
    trainer = apa_actor_trainer(StandInActorTrainer, lam=LAM)()
    assert isinstance(trainer.actor_loss_fn, APAPolicyLoss)
    loss = trainer.training_step(experience, kl_ctl=0.1, step=0, loss_batch_info=dict(batch_num_tokens=30.0))
    expected = (apa_per_token64(log_probs, ref, advantages) * mask).sum() / 30.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    experience.base_action_log_probs = None
    with pytest.raises(ValueError, match="--algo.kl.use_loss"):
        trainer.training_step(experience, kl_ctl=0.1, step=0, loss_batch_info={})
    with pytest.raises(ValueError, match="ref_log_probs"):
        trainer.actor_loss_fn(log_probs, old, advantages, mask)


def test_install_replaces_the_trainer_class_of_the_actor_module(monkeypatch):
    """install() as Ray's worker_process_setup_hook runs it: no arguments, lam from APA_FAST_LAM."""
    ppo_actor = types.ModuleType("openrlhf.trainer.ray.ppo_actor")
    ppo_actor.ActorPPOTrainer = StandInActorTrainer
    for name in ("openrlhf", "openrlhf.trainer", "openrlhf.trainer.ray"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ray.ppo_actor", ppo_actor)
    sys.modules["openrlhf.trainer.ray"].ppo_actor = ppo_actor
    monkeypatch.setenv("APA_FAST_LAM", "0.25")
    install()
    trainer = ppo_actor.ActorPPOTrainer()
    assert isinstance(trainer, StandInActorTrainer) and trainer.actor_loss_fn.lam == 0.25

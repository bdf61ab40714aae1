"""APA in verl: a config recipe, because verl's policy losses never see the reference log-probs.

Read against verl 0.9.1 (``verl/trainer/ppo/core_algos.py``, ``verl/workers/utils/losses.py``):

- A policy loss registered with ``@register_policy_loss(name)`` is called as ``fn(old_log_prob=, log_prob=,
  advantages=, response_mask=, loss_agg_mode=, config=, rollout_is_weights=)``: no logits, no
  ``ref_log_prob``. So an ``"apa"`` entry cannot compute APA's residual.
- ``ref_log_prob`` reaches only the KL loss: with ``actor.use_kl_loss``, verl adds
  ``kl_loss_coef * agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type))`` with the same aggregation
  as the policy loss; ``kl_loss_type="mse"`` is ``0.5 * (log_prob - ref_log_prob) ** 2``.
- ``loss_mode="gpg"`` is ``agg_loss(-advantages * log_prob)``.

Per token, with ``d = log_prob - ref_log_prob``, gpg plus the MSE KL loss at ``kl_loss_coef = lam`` is

    -A * log_prob + (lam / 2) * d ** 2  =  (lam / 2) * (d - A / lam) ** 2  -  A ** 2 / (2 lam)  -  A * ref_log_prob

APA's squared residual times ``lam / 2`` plus terms without gradient: the same update direction as APA, with
the gradient scaled by ``lam / 2`` (Adam is insensitive to that scale; with SGD multiply the learning rate by
``2 / lam``). The logged ``actor/pg_loss`` and ``kl_loss`` are the two parts, not APA's loss. It holds for
every ``loss_agg_mode``, since both terms are aggregated alike, provided nothing else enters the actor's loss
but the entropy bonus: no KL in the reward (which would change ``A``), no rollout importance weights (gpg
multiplies its term by them, not the KL term).

The entropy bonus composes: verl's ``ppo_loss`` (``verl/workers/utils/losses.py``) subtracts
``entropy_coeff * agg_loss(entropy)``, aggregated like the other two terms, with ``entropy`` the per-token
entropy of ``softmax(logits / temperature)``, the distribution ``log_prob`` is read from. So the actor's loss is

    (lam / 2) * [APA's loss  -  (2 * entropy_coeff / lam) * agg_loss(entropy)]  +  terms without gradient:

``lam / 2`` times ``apa_fast.loss(..., lam=lam, entropy_coef=2 * entropy_coeff / lam)`` under the same
aggregation. `hydra_overrides(lam, entropy_coef)` takes the coefficient in apa_fast's units and sets
``entropy_coeff = entropy_coef * lam / 2``; `check_config` accepts any ``entropy_coeff`` in apa_fast's range.

`hydra_overrides(lam)` gives the settings; `check_config(config, lam)` raises on a config that departs from
them. This module imports no verl code.
"""

from __future__ import annotations

from apa_fast.kinds import ENTROPY_COEF, HYPER_RANGES
from apa_fast.validation import check_number

# (dotted key in verl's PPO trainer config, accepted values, the value the overrides set), as of verl 0.9.1.
_RECIPE = (
    ("actor_rollout_ref.actor.policy_loss.loss_mode", ("gpg",), "gpg"),
    ("actor_rollout_ref.actor.use_kl_loss", (True,), "true"),
    ("actor_rollout_ref.actor.kl_loss_type", ("mse", "k2"), "mse"),  # k2 is verl's other name for mse
    ("algorithm.use_kl_in_reward", (False,), "false"),
    ("algorithm.rollout_correction.rollout_is", (None,), "null"),
)
_KL_COEF = "actor_rollout_ref.actor.kl_loss_coef"
_ENTROPY_COEF = "actor_rollout_ref.actor.entropy_coeff"


def _check_lam(lam) -> float:
    """``lam`` as a float, in `apa_fast.loss`'s range (the recipe's gradient is APA's at that lam)."""
    return float(check_number("lam", lam, HYPER_RANGES["lam"]))


def _matches(node, value) -> bool:
    """Equality that keeps booleans, None and numbers apart (True is not 1, False is not 0)."""
    if isinstance(value, bool) or value is None:
        return node is value
    return not isinstance(node, bool) and node == value


def hydra_overrides(lam: float = 1.0, entropy_coef: float = 0.0) -> list[str]:
    """The command-line overrides of verl's PPO trainer that train with the gradient of ``lam / 2`` times
    ``apa_fast.loss(..., lam=lam, entropy_coef=entropy_coef)``: verl's ``entropy_coeff = entropy_coef * lam / 2``."""
    lam = _check_lam(lam)
    entropy_coeff = float(check_number("entropy_coef", entropy_coef, ENTROPY_COEF)) * lam / 2
    return ([f"{key}={value}" for key, _, value in _RECIPE]
            + [f"{_KL_COEF}={lam!r}", f"{_ENTROPY_COEF}={entropy_coeff!r}"])


def check_config(config, lam: float = 1.0) -> None:
    """Raise ValueError naming the first key of a verl config (nested dicts or OmegaConf) off the APA recipe."""
    lam = _check_lam(lam)
    for key, accepted, _ in _RECIPE + ((_KL_COEF, (lam,), None),):
        node = _lookup(config, key, f"in {accepted}")
        if not any(_matches(node, value) for value in accepted):
            raise ValueError(f"verl config {key}={node!r}; the APA recipe needs one of {accepted}"
                             + (f" (kl_loss_coef = lam = {lam})" if key == _KL_COEF else ""))
    # Any entropy bonus composes with the recipe: apa_fast's entropy_coef = 2 * entropy_coeff / lam.
    check_number(_ENTROPY_COEF, _lookup(config, _ENTROPY_COEF, "as a number"), ENTROPY_COEF)


def _lookup(config, key: str, needed: str):
    """``config[a][b]...`` for the dotted ``key``; a ValueError saying what the recipe needs when it is missing."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"verl config has no {key}; the APA recipe needs it {needed}") from exc
    return node

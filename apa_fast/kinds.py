"""The loss kinds of the fused log-prob family, each declared once.

A kind is everything the library needs to know about one loss on top of the token log-probability
``logp = log_softmax(logits / T)[label]``: its id (the ``LOSS`` constexpr that selects the Triton kernels'
epilogue), the per-token tensors it reads, its hyper-parameters by name (each with its accepted range in
`HYPER_RANGES`) and how they reach the kernel (two float slots, ``param0``/``param1``), its torch epilogue
(the torch backend's twin of the kernel's), and its plain float64 formula (what `apa_fast.reference` and the
tests use as the oracle).

Adding a loss: one `LossKind` entry here (and a range for each new hyper-parameter), its epilogue branch in
``kernels/logprob.py``, and a public function in ``apa_fast/logprob.py``; the AOT variants, the reference, the
tests and the trainer read this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .validation import Range


@dataclasses.dataclass(frozen=True)
class LossKind:
    """One loss of the family.

    ``kernel_params(**hyper) -> (param0, param1)``: the hyper-parameters as the kernels read them.
    ``epilogue(logp, aux, adv, param0, param1) -> (loss, dloss_dlogp)``: elementwise on float tensors of the
    token rows (float32 in the torch backend); ``aux``/``adv`` are empty tensors when the kind reads none.
    ``reference(logp, aux, adv, **hyper) -> loss``: the textbook formula, autograd-differentiable, any dtype.
    """

    id: int
    name: str
    aux: str | None  # the per-token float input beside the advantages ("ref_logprobs", "old_logprobs") or None
    reads_advantages: bool
    hyper: tuple[str, ...]  # names; the accepted range of each is HYPER_RANGES[name]
    kernel_params: Callable[..., tuple[float, float]]
    epilogue: Callable
    reference: Callable


# The accepted range of each hyper-parameter, ends included: the float32 arithmetic the kernels (and the torch
# epilogues) do on it stays finite and exact to float32 rounding for every accepted value, so both backends give
# the float64 answer. ``lam`` is one parameter of APA and AWR alike: both multiply the advantages by 1/lam.
HYPER_RANGES: dict[str, Range] = {
    # 1e-40 would make 1/lam inf, and a zero advantage times it NaN.
    "lam": Range(1e-6, 1e6, "the float32 kernels multiply the advantages by 1/lam, which must stay a normal number"),
    "clip_eps": Range(1e-6, 1e6, "1 - clip_eps and 1 + clip_eps must stay finite float32 numbers distinct from 1"),
    "max_weight": Range(1e-6, 1e6, "the weight, times 1/temperature and 1/normalizer, must stay a finite float32 "
                                   "gradient scale"),
}


# entropy_coef, accepted by every loss kind: the loss is the kind's minus entropy_coef * entropy (any sign: a
# negative coefficient penalises entropy).
ENTROPY_COEF = Range(-1e6, 1e6, "the float32 kernels scale the entropy's gradient by it beside the kind's own")


def _logprob_epilogue(logp, aux, adv, param0, param1):
    return logp, torch.ones_like(logp)


def _apa_epilogue(logp, aux, adv, inv_lam, param1):
    residual = logp - aux - adv * inv_lam
    return residual.square(), 2.0 * residual


def _ppo_epilogue(logp, aux, adv, clip_eps, param1):
    ratio = torch.exp(logp - aux)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    # The clipped branch is constant in logp; where both agree the ratio is inside the clip range.
    return torch.maximum(unclipped, clipped), torch.where(unclipped >= clipped, unclipped, 0.0)


def _awr_epilogue(logp, aux, adv, inv_lam, max_weight):
    weight = torch.exp(adv * inv_lam).clamp(max=max_weight)
    return -weight * logp, -weight


def _ppo_reference(logp, old_logprobs, advantages, *, clip_eps):
    ratio = torch.exp(logp - old_logprobs)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))


LOGPROB = LossKind(0, "logprobs", None, False, (), lambda: (0.0, 0.0), _logprob_epilogue,
                   lambda logp, aux, adv: logp)
APA = LossKind(1, "apa", "ref_logprobs", True, ("lam",), lambda lam: (1.0 / lam, 0.0), _apa_epilogue,
               lambda logp, ref_logprobs, advantages, *, lam: (logp - ref_logprobs - advantages / lam) ** 2)
PPO = LossKind(2, "ppo", "old_logprobs", True, ("clip_eps",), lambda clip_eps: (clip_eps, 0.0), _ppo_epilogue,
               _ppo_reference)
AWR = LossKind(3, "awr", None, True, ("lam", "max_weight"), lambda lam, max_weight: (1.0 / lam, max_weight),
               _awr_epilogue,
               lambda logp, aux, advantages, *, lam, max_weight: -torch.exp(advantages / lam).clamp(max=max_weight)
               * logp)

KINDS: tuple[LossKind, ...] = (LOGPROB, APA, PPO, AWR)
BY_NAME: dict[str, LossKind] = {kind.name: kind for kind in KINDS}
assert [kind.id for kind in KINDS] == list(range(len(KINDS))), "kind ids index KINDS"
assert {name for kind in KINDS for name in kind.hyper} == set(HYPER_RANGES), "every hyper-parameter has a range"

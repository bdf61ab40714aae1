"""The loss kinds of the fused log-prob family, each declared once.

A kind is everything the library needs to know about one loss on top of the token log-probability
``logp = log_softmax(logits / T)[label]``: its id (the ``LOSS`` constexpr that selects the Triton kernels'
epilogue), the per-token tensors it reads, its hyper-parameters by name and how they reach the kernel
(two float slots, ``param0``/``param1``), its torch epilogue (the torch backend's twin of the kernel's),
and its plain float64 formula (what `apa_fast.reference` and the tests use as the oracle).

Adding a loss: one `LossKind` entry here, its epilogue branch in ``kernels/logprob.py``, and a public
function in ``apa_fast/ops.py``; the AOT variants, the reference, the tests and the trainer read this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


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
    hyper: tuple[str, ...]
    kernel_params: Callable[..., tuple[float, float]]
    epilogue: Callable
    reference: Callable


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

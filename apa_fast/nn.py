"""Module wrapper of the fused APA loss, for trainers that compose losses as ``nn.Module``s."""

from __future__ import annotations

import torch

from ._dispatch import LOSS_BACKENDS
from .kinds import HYPER_RANGES
from .logprob import loss
from .validation import REDUCTIONS, TEMPERATURE, check_choice, check_integer, check_number


class APALoss(torch.nn.Module):
    """``APALoss(lam=..., ...)(logits, labels, ref_logprobs, advantages, mask=None, *, normalizer=None)`` ==
    ``apa_fast.loss(...)`` with the stored hyper-parameters.

    The hyper-parameters are checked at construction, as `apa_fast.loss` checks them (so ``APALoss(lam=-1)``
    raises there, not at the first call). ``normalizer`` is per call, as it changes with each micro-batch: the
    token count of the whole accumulated batch, so that the micro-batch losses add up to its token mean (see
    `apa_fast.loss`). Shapes, dtypes and semantics: `apa_fast.loss`.
    """

    def __init__(self, lam=1.0, *, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto",
                 inplace_backward=False):
        super().__init__()
        self.lam = check_number("lam", lam, HYPER_RANGES["lam"])
        self.temperature = check_number("temperature", temperature, TEMPERATURE)
        self.ignore_index = check_integer("ignore_index", ignore_index)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, LOSS_BACKENDS)
        self.inplace_backward = inplace_backward

    def forward(self, logits, labels, ref_logprobs, advantages, mask=None, *, normalizer=None):
        return loss(logits, labels, ref_logprobs, advantages, mask, lam=self.lam, temperature=self.temperature,
                    ignore_index=self.ignore_index, reduction=self.reduction, normalizer=normalizer,
                    backend=self.backend, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")

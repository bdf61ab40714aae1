"""Module wrapper of the fused APA loss, for trainers that compose losses as ``nn.Module``s."""

from __future__ import annotations

import torch

from .logprob import loss


class APALoss(torch.nn.Module):
    """``APALoss(lam=..., ...)(logits, labels, ref_logprobs, advantages, mask=None)`` == ``apa_fast.loss(...)``.

    Stores only the hyper-parameters; see `apa_fast.loss` for shapes, dtypes and semantics.
    """

    def __init__(self, lam=1.0, *, temperature=1.0, ignore_index=-100, reduction="mean", backend="auto",
                 inplace_backward=False):
        super().__init__()
        self.lam, self.temperature, self.ignore_index = lam, temperature, ignore_index
        self.reduction, self.backend, self.inplace_backward = reduction, backend, inplace_backward

    def forward(self, logits, labels, ref_logprobs, advantages, mask=None):
        return loss(logits, labels, ref_logprobs, advantages, mask, lam=self.lam, temperature=self.temperature,
                    ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                    inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"lam={self.lam}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")

"""apa_fast: fused kernels for RLHF fine-tuning with APA (Advantage-Induced Policy Alignment).

Public API (see README.md):
    apa_fast.loss        fused APA loss on logits
    apa_fast.logprobs    fused token log-probabilities
    apa_fast.ppo_loss    PPO's clipped surrogate through the same kernel (baseline)
    apa_fast.awr_loss    AWR's weighted log-likelihood through the same kernel (baseline)
    apa_fast.apa_loss_from_logprobs   the APA formula on log-probs a framework already computed (plain PyTorch)
    apa_fast.linear_loss / linear_ppo_loss / linear_awr_loss / linear_logprobs   the same from hidden states and
                         the lm_head (no logits)
    apa_fast.gae         batched generalized advantage estimation (compiled extension or torch)
    apa_fast.APALoss     nn.Module wrapper of apa_fast.loss
    apa_fast.zero3       gather a ZeRO-3 partitioned lm_head for linear_loss
    apa_fast.reference   the unfused PyTorch versions (benchmark baseline, test oracle's sibling)

Importing the package needs only torch: Triton, the compiled extension and the trainer's dependencies
load lazily, and `python -m apa_fast.info` explains any that are missing.
"""

from . import reference, validation, zero3
from .gae import gae
from .linear import linear_awr_loss, linear_logprobs, linear_loss, linear_ppo_loss
from .logprob import apa_loss_from_logprobs, awr_loss, logprobs, loss, ppo_loss
from .nn import APALoss

__version__ = "0.1.0"
__all__ = [
    "loss", "logprobs", "ppo_loss", "awr_loss", "apa_loss_from_logprobs", "linear_loss", "linear_ppo_loss",
    "linear_awr_loss", "linear_logprobs", "gae",
    "APALoss", "reference", "validation", "zero3", "__version__",
]

"""`apa_fast.linear_loss` with a DeepSpeed ZeRO-3 partitioned lm_head.

Under ZeRO-3 each rank holds a slice of every parameter; a module's forward hook gathers its weights. The
fused linear losses read ``lm_head.weight`` without calling the lm_head module, so nothing gathers it (the
known failure of fused-linear losses under ZeRO-3: a ``(0,)``-shaped weight). Wrap the loss, forward AND
backward, in `gathered`::

    with apa_fast.zero3.gathered(lm_head.weight, lm_head.bias):
        loss = apa_fast.linear_loss(hidden, lm_head.weight, labels, ref_logprobs, advantages, mask,
                                    bias=lm_head.bias)
        engine.backward(loss)

Inside, the parameter holds its full ``(V, H)`` value on every rank (`deepspeed.zero.GatheredParameters`
with ``modifier_rank=None``: nothing is broadcast back on exit). The loss's gradient for the full weight
then reaches ZeRO-3's post-accumulate-grad hook on that parameter, which reduce-scatters it into each rank's
partition like any other gradient. Backward must run inside too: on exit the parameter is re-partitioned,
and a full-size gradient arriving for it fails with a size mismatch (checked with DeepSpeed
0.19.8 in tests/test_linear_zero3.py).

Without DeepSpeed, or for parameters that are not partitioned, `gathered` does nothing. DeepSpeed is
imported only when a partitioned parameter is passed.
"""

from __future__ import annotations

import contextlib

import torch


def is_partitioned(param) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (it carries a ``ds_id``)."""
    return isinstance(param, torch.Tensor) and hasattr(param, "ds_id")


def check_gathered(name: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` if ``tensor`` is a ZeRO-3 parameter whose full value is not present."""
    if is_partitioned(tensor) and tuple(tensor.shape) != tuple(getattr(tensor, "ds_shape", tensor.shape)):
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned parameter that is not gathered (local shape "
            f"{tuple(tensor.shape)}, full shape {tuple(tensor.ds_shape)}): run the loss and its backward inside "
            f"`with apa_fast.zero3.gathered({name}, ...):`")


@contextlib.contextmanager
def gathered(*params):
    """Hold the full value of every ZeRO-3 partitioned tensor among ``params`` (None entries are skipped)."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield

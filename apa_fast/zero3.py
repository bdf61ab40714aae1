"""`apa_fast.linear_loss` with a DeepSpeed ZeRO-3 partitioned lm_head.

Under ZeRO-3 each rank holds a slice of every parameter; a module's forward hook gathers its weights. The
fused linear losses read ``lm_head.weight`` without calling the lm_head module, so nothing gathers it (the
known failure of fused-linear losses under ZeRO-3: a ``(0,)``-shaped weight). Wrap the loss, forward AND
backward, in `gathered`::

    with apa_fast.zero3.gathered(lm_head.weight, lm_head.bias, model=engine.module):
        loss = apa_fast.linear_loss(hidden, lm_head.weight, labels, ref_logprobs, advantages, mask,
                                    bias=lm_head.bias)
        engine.backward(loss)

Inside, the parameter holds its full ``(V, H)`` value on every rank (`deepspeed.zero.GatheredParameters`
with ``modifier_rank=None``: nothing is broadcast back on exit). The loss's gradient for the full weight
then reaches ZeRO-3's post-accumulate-grad hook on that parameter, which reduce-scatters it into each rank's
partition like any other gradient. Backward must run inside too: on exit the parameter is re-partitioned,
and a full-size gradient arriving for it fails with a size mismatch (checked with DeepSpeed
0.19.8 in tests/test_linear_zero3.py).

Pass ``model=engine.module`` (or the engine) when the model ran a forward before: ZeRO-3's prefetcher, whose
recorded module order has the lm_head after the last block (generation calls it), starts an asynchronous
all-gather of the lm_head weight during that forward and files its handle in the model's in-flight registry.
`deepspeed.zero.GatheredParameters` skips an in-flight parameter (its data is not there yet) and then fails to
re-partition it on exit ("Cannot partition a param in flight"); `gathered` first waits for that all-gather,
taking it out of the registry as the prefetcher's own fetch does, so prefetching can stay on.

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
def gathered(*params, model=None):
    """Hold the full value of every ZeRO-3 partitioned tensor among ``params`` (None entries are skipped).

    ``model``: the module the DeepSpeed engine wraps, or the engine; needed when ZeRO-3's prefetcher may have
    an all-gather of ``params`` in flight (see the module docstring).
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    _wait_in_flight(partitioned, model)
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
        _wait_in_flight(partitioned, model)  # (none expected: a held parameter is AVAILABLE, never prefetched)


def _wait_in_flight(params, model) -> None:
    """Complete the prefetcher's in-flight all-gathers of ``params``: each becomes AVAILABLE, full-size."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    in_flight = [p for p in params if p.ds_status == ZeroParamStatus.INFLIGHT]
    if not in_flight:
        return
    registries = [getattr(m, "ds_inflight_param_registry", None) for m in (model, getattr(model, "module", None))]
    registry = next((r for r in registries if r is not None), None)
    if registry is None:
        raise RuntimeError(
            "ZeRO-3's prefetcher has an all-gather of a parameter passed to apa_fast.zero3.gathered in flight; "
            "pass the model (`gathered(..., model=engine.module)`) so that it can be waited for")
    for param in in_flight:
        if param in registry:  # the coordinator waits the same way (`registry.pop(param).wait()`)
            registry.pop(param).wait()
        if param.ds_status != ZeroParamStatus.AVAILABLE:
            raise RuntimeError(f"could not complete the in-flight all-gather of {param.ds_summary()}")

"""apa_fast.linear_loss with a DeepSpeed ZeRO-3 partitioned lm_head: two processes on gloo (CPU).

The pytest test launches this file under ``torchrun --nproc_per_node 2``; each rank trains a tiny
"body + lm_head" model one step with ZeRO-3 (every parameter partitioned, a torch SGD optimizer so that no
DeepSpeed op compiles) and checks, against an unpartitioned float32 replica that sees both ranks' batches:
the loss, the full (all-reduced) gradients of every parameter, and the parameters after the step. It also
checks that a partitioned weight that was not gathered is refused with a message naming the fix, and that
a backward run after leaving `apa_fast.zero3.gathered` fails (the reason the helper must cover it), and
that a lm_head weight that ZeRO-3's prefetcher has in flight when the context opens is waited for.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HIDDEN, VOCAB, TOKENS, LR = 24, 301, (3, 11), 0.5
REDUCTIONS = ("mean", "none")  # the gradient computed in the forward, and the one recomputed in the backward
ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": TOKENS[0],
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to norm 1.0 unless told otherwise
}


@pytest.mark.slow
def test_zero3_two_ranks_match_an_unpartitioned_replica():
    pytest.importorskip("deepspeed")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APA_FAST_ZERO3_WORKER": "1"}
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), __file__],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    for reduction in REDUCTIONS:
        assert f"rank 0 zero3 {reduction} ok" in done.stdout and f"rank 1 zero3 {reduction} ok" in done.stdout
    assert "rank 0 refused ungathered ok" in done.stdout
    assert "rank 0 backward outside fails ok" in done.stdout
    assert "rank 0 prefetched lm_head ok" in done.stdout and "rank 1 prefetched lm_head ok" in done.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# The worker (one per rank).
# ----------------------------------------------------------------------------------------------------
def _tiny_model():
    import torch

    class BodyAndHead(torch.nn.Module):
        """forward returns the final hidden states; the lm_head is only read by the fused loss."""

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(HIDDEN, HIDDEN)
            self.lm_head = torch.nn.Linear(HIDDEN, VOCAB)  # with a bias, like GPT-J's

        def forward(self, x):
            return torch.tanh(self.body(x))

    return BodyAndHead()


def _batch(rank):
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(*TOKENS, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, TOKENS, generator=gen)
    labels[:, :2] = -100
    ref_logprobs = -torch.rand(TOKENS, generator=gen) - 5.0
    advantages = torch.randn(TOKENS, generator=gen)
    mask = torch.rand(TOKENS, generator=gen) > 0.2
    weights = torch.randn(TOKENS, generator=gen)  # turn reduction="none" into a scalar
    return x, labels, ref_logprobs, advantages, mask, weights


def _objective(per_token_or_scalar, weights):
    return per_token_or_scalar if per_token_or_scalar.dim() == 0 else (per_token_or_scalar * weights).sum()


def _replica_step(model, world, reduction):
    """(loss on each rank, full gradients averaged over ranks, parameters after SGD) without ZeRO."""
    import torch

    import apa_fast

    losses = []
    for rank in range(world):
        x, labels, ref_logprobs, advantages, mask, weights = _batch(rank)
        logits = model(x) @ model.lm_head.weight.T + model.lm_head.bias
        loss = _objective(apa_fast.loss(logits, labels, ref_logprobs, advantages, mask, lam=0.5,
                                        reduction=reduction, backend="torch"), weights)
        (loss / world).backward()  # data parallelism averages the ranks' gradients
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        params = {name: p - LR * p.grad for name, p in model.named_parameters()}
    return losses, grads, params


def _assert_close(what, got, want, tol=1e-5):
    err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-6)
    assert err <= tol, f"{what}: relative error {err:.2e}"


def _zero3_step(reduction, rank, world):
    import copy

    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    import apa_fast.linear
    import apa_fast.zero3

    torch.manual_seed(0)  # the same initial weights on every rank
    model = _tiny_model()
    want_losses, want_grads, want_params = _replica_step(copy.deepcopy(model), world, reduction)

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ZERO3_CONFIG)
    head = engine.module.lm_head
    assert apa_fast.zero3.is_partitioned(head.weight) and head.weight.numel() == 0
    x, labels, ref_logprobs, advantages, mask, weights = _batch(rank)
    hidden = engine(x)
    with apa_fast.zero3.gathered(head.weight, head.bias):
        loss = _objective(apa_fast.linear.linear_loss(hidden, head.weight, labels, ref_logprobs, advantages, mask,
                                                      bias=head.bias, lam=0.5, reduction=reduction, chunk_size=7,
                                                      backend="torch"), weights)
        engine.backward(loss)
    _assert_close("loss", loss.detach(), want_losses[rank])
    for name, param in engine.module.named_parameters():
        _assert_close(f"grad of {name}", safe_get_full_grad(param), want_grads[name])
    engine.step()
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters(param):
            _assert_close(f"{name} after the step", param.detach(), want_params[name])
    print(f"rank {rank} zero3 {reduction} ok", flush=True)
    return engine


def _check_refused(engine, rank):
    import torch

    import apa_fast.linear

    head = engine.module.lm_head
    x, labels, ref_logprobs, advantages, mask, _ = _batch(rank)
    try:
        apa_fast.linear.linear_loss(torch.randn(*TOKENS, HIDDEN), head.weight, labels, ref_logprobs, advantages)
    except ValueError as exc:
        assert "not gathered" in str(exc) and "apa_fast.zero3.gathered" in str(exc), exc
        print(f"rank {rank} refused ungathered ok", flush=True)
    else:
        raise AssertionError("a partitioned, ungathered lm_head weight was accepted")


def _check_backward_outside_fails(engine, rank):
    """Documents why `gathered` must cover the backward: after exit the weight is re-partitioned."""
    import apa_fast.linear
    import apa_fast.zero3

    head = engine.module.lm_head
    x, labels, ref_logprobs, advantages, mask, _ = _batch(rank)
    with apa_fast.zero3.gathered(head.weight, head.bias):
        loss = apa_fast.linear.linear_loss(engine(x), head.weight, labels, ref_logprobs, advantages, mask,
                                           bias=head.bias, backend="torch")
    try:
        engine.backward(loss)
    except RuntimeError as exc:
        assert "size" in str(exc), exc
        print(f"rank {rank} backward outside fails ok", flush=True)
    else:
        raise AssertionError("a backward outside `gathered` went through: update apa_fast.zero3's docstring")


def _check_prefetched_head(rank):
    """ZeRO-3's prefetcher can leave an all-gather of the lm_head in flight when the context opens (the
    trainer's update forward: the module trace recorded in generation continues with the lm_head). Started
    here as the coordinator starts it (`all_gather_coalesced`, the handle filed in the model's in-flight
    registry); `gathered(..., model=)` must wait for it (DeepSpeed 0.19.8's GatheredParameters skips it on
    entry, its data not there yet, and fails on exit: "Cannot partition a param in flight")."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    import apa_fast.linear
    import apa_fast.zero3

    torch.manual_seed(0)
    model = _tiny_model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ZERO3_CONFIG)
    head = engine.module.lm_head
    with deepspeed.zero.GatheredParameters([head.weight, head.bias]):
        want = head.weight.detach().clone(), head.bias.detach().clone()
    x, labels, ref_logprobs, advantages, mask, _ = _batch(rank)
    hidden = engine(x)
    registry = engine.module.ds_inflight_param_registry
    handle = head.weight.all_gather_coalesced([head.weight, head.bias])  # the prefetch
    registry[head.weight] = registry[head.bias] = handle
    assert head.weight.ds_status == ZeroParamStatus.INFLIGHT, head.weight.ds_summary()
    try:
        with apa_fast.zero3.gathered(head.weight, head.bias):
            pass
    except RuntimeError as exc:
        assert "model=engine.module" in str(exc), exc
    else:
        raise AssertionError("an in-flight lm_head was accepted without the model to wait for it")
    with apa_fast.zero3.gathered(head.weight, head.bias, model=engine.module):
        torch.testing.assert_close(head.weight.detach(), want[0], rtol=0, atol=0)
        torch.testing.assert_close(head.bias.detach(), want[1], rtol=0, atol=0)
        loss = apa_fast.linear.linear_loss(hidden, head.weight, labels, ref_logprobs, advantages, mask,
                                           bias=head.bias, backend="torch")
        engine.backward(loss)
    assert head.weight.ds_status == ZeroParamStatus.NOT_AVAILABLE and head.weight.numel() == 0
    assert head.weight not in registry and head.bias not in registry
    engine.step()
    print(f"rank {rank} prefetched lm_head ok", flush=True)


def _worker():
    import deepspeed
    import torch.distributed as dist

    # The shared-memory all-reduce op serves only DeepSpeed's inference all-reduce; building it costs ~35 s
    # of compilation on first use. Marking it incompatible makes the gloo backend skip it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for reduction in REDUCTIONS:
        engine = _zero3_step(reduction, rank, world)
    _check_refused(engine, rank)
    _check_backward_outside_fails(engine, rank)
    _check_prefetched_head(rank)
    dist.destroy_process_group()


if __name__ == "__main__" and os.environ.get("APA_FAST_ZERO3_WORKER") == "1":
    _worker()

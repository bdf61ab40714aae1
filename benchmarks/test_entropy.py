"""Benchmarks of the entropy (issue 20): each op with the entropy off against the same op with it on.

Forward + backward (mode "full") of:

* ``apa_loss``: `apa_fast.loss` (lam 0.1) against the same with ``entropy_coef=0.01, return_entropy=True``, in
  both gradient designs (variant None: two kernels; ``fused_grad``: training mode);
* ``logprobs``: `apa_fast.logprobs` against ``return_entropy=True``, the upstream gradient reaching both outputs;
* ``linear_loss``: `apa_fast.linear_loss` (``provider="fused_linear"``, as in `benchmarks/test_linear.py`) with the
  entropy off and on, hidden, weight and bias gradients.

Records carry the case field ``entropy`` (False / True) beside the usual ones, and, for the logits ops, the
memory floor and ``bytes_by_design`` of `benchmarks.logprob_providers`: the entropy adds no pass over the logits
(one more float32 a token written by the forward, two read by the two-kernel backward; benchmarks/README.md).
CPU: 1,024 x 32,000 fp32 (the log-prob benchmarks' CPU shape) and 2,048 x H 1,024 x V 50,400 fp32 (the linear
benchmarks' smaller CPU shape). GPU (``--grid full``): the headline shapes, 16,384 x 50,400 bf16 and GPT-J's head
at 8,192 tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch

import apa_fast
from benchmarks import harness
from benchmarks import logprob_providers as providers
from benchmarks import test_linear as linear_cases
from benchmarks.records import append_record

ENTROPY_COEF = 0.01
LAM = providers.LAM
SHAPES = {  # grid: (logits-op shape, linear-op shape)
    "small": ({"tokens": 1024, "vocab": 32000, "dtype": "float32"},
              {"tokens": 2048, "hidden": 1024, "vocab": 50400, "dtype": "float32"}),
    "full": ({"tokens": 16384, "vocab": 50400, "dtype": "bfloat16"},
             {"tokens": 8192, "hidden": 4096, "vocab": 50400, "dtype": "bfloat16"}),
}


@dataclass(frozen=True)
class Case:
    op: str
    entropy: bool
    tokens: int
    vocab: int
    dtype: str
    variant: str | None = None  # apa_loss's design: None (two kernels) or "fused_grad"
    hidden: int | None = None  # linear_loss only
    mode: str = "full"

    @property
    def provider(self) -> str:
        return "fused_linear" if self.op == "linear_loss" else "apa_fast"

    @property
    def id(self) -> str:
        design = f"-{self.variant}" if self.variant else ""
        shape = f"{self.tokens}x{self.hidden}x{self.vocab}" if self.hidden else f"{self.tokens}x{self.vocab}"
        return f"{self.op}{design}-entropy_{'on' if self.entropy else 'off'}-{shape}-{self.dtype}"

    def fields(self) -> dict:
        fields = {key: value for key, value in asdict(self).items() if value is not None}
        return {**fields, "provider": self.provider}


def cases(grid: str) -> list[Case]:
    logits_shape, linear_shape = SHAPES[grid]
    out = []
    for entropy in (False, True):
        out += [Case("apa_loss", entropy, **logits_shape), Case("apa_loss", entropy, **logits_shape,
                                                                variant="fused_grad"),
                Case("logprobs", entropy, **logits_shape), Case("linear_loss", entropy, **linear_shape)]
    return sorted(out, key=lambda case: (case.op, case.variant or "", case.entropy))  # off beside on


def _logits_case(case: Case) -> providers.Case:
    return providers.Case(case.op, "apa_fast", case.mode, case.tokens, case.vocab, case.dtype, case.variant)


def build_step(case: Case, device: str):
    """``(step, leaves)``: one forward + backward, gradients returned (not accumulated in ``.grad``)."""
    entropy = {"entropy_coef": ENTROPY_COEF, "return_entropy": True} if case.entropy else {}
    if case.op == "linear_loss":
        inputs = linear_cases.make_inputs(linear_cases.Case("fused_linear", case.tokens, case.hidden, case.vocab,
                                                            case.dtype), device)
        leaves = [inputs[name] for name in ("hidden", "weight", "bias")]
        data = (inputs["labels"], inputs["ref_logprobs"], inputs["advantages"], inputs["mask"])

        def objective():
            out = apa_fast.linear_loss(*leaves[:2], *data, bias=leaves[2], lam=LAM, **entropy)
            return out[0] if case.entropy else out

        return lambda: torch.autograd.grad(objective(), leaves)
    inputs = providers.make_inputs(_logits_case(case), device)
    logits, upstream = inputs["logits"], inputs["upstream"]
    design = providers.FUSED_GRAD[case.variant]
    if case.op == "apa_loss":
        def objective():
            out = apa_fast.loss(logits, inputs["labels"], inputs["ref_logprobs"], inputs["advantages"], lam=LAM,
                                **entropy)
            return out[0] if case.entropy else out
    else:
        def objective():
            if not case.entropy:
                return (apa_fast.logprobs(logits, inputs["labels"]) * upstream).sum()
            logp, ent = apa_fast.logprobs(logits, inputs["labels"], return_entropy=True)
            return (logp * upstream).sum() + ENTROPY_COEF * ent.sum()

    return lambda: providers._with_design(design, lambda: torch.autograd.grad(objective(), logits))


@pytest.mark.parametrize("case", cases("small") + cases("full"), ids=lambda case: case.id)
def test_entropy_on_and_off(case, benchmark, device, grid, copy_gbps):
    if case not in cases(grid):
        pytest.skip(f"not in the {grid} grid")
    fields = {**case.fields(), "backend": apa_fast._dispatch.pick_loss_backend("auto", torch.device(device))}
    floor = None
    if case.op != "linear_loss":
        floor = providers.floor_bytes(_logits_case(case))
        fields["bytes_by_design"] = providers.bytes_by_design(_logits_case(case))
    try:
        result = harness.measure(benchmark, build_step(case, device), device=device, floor_bytes=floor,
                                 copy_gbps=copy_gbps)
    except Exception as exc:
        if not harness.is_out_of_memory(exc):
            raise
        harness.release_memory(device)
        append_record(device, **fields, error="out of memory")
        pytest.skip(f"out of memory: {case.id}")
    append_record(device, **fields, **result)

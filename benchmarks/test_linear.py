"""Benchmarks of `apa_fast.linear.linear_loss` (the APA loss from hidden states) against the lm_head matmul
followed by `apa_fast.loss` (materialised logits) and by the unfused reference.

Each case is one forward + backward of the scalar loss (mode "full") with gradients for hidden, weight and
bias (their memory counts in every provider's peak); records carry op "linear_loss" and the hidden size. Providers:

* ``fused_linear``: `apa_fast.linear.linear_loss`;
* ``matmul+fused``: ``apa_fast.loss(hidden @ weight.T + bias, ...)``;
* ``matmul+reference``: ``apa_fast.reference.apa_loss(hidden @ weight.T + bias, ...)``.

CPU (always): 4,096 tokens x H 1,024 x V 50,400 float32, peak resident memory only (one call takes ~30 s
on 2 cores), measured in a fresh process by `benchmarks.memory`; the fused path must stay under
`CPU_MEMORY_RATIO` of the materialised one. CUDA (skipped without it): GPT-J's lm_head, H 4,096 x V 50,400
bf16, 4k-16k tokens: time and peak memory through `benchmarks.harness.measure`.

This module is also the case module `benchmarks.memory` loads (``Case``, ``make_inputs``,
``build_measurement``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch

import apa_fast
from apa_fast.linear import linear_loss
from benchmarks import harness
from benchmarks.memory import peak_rss_in_subprocess
from benchmarks.records import append_record

PROVIDERS = ("fused_linear", "matmul+fused", "matmul+reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_TOKENS, CPU_HIDDEN, VOCAB = 4096, 1024, 50400
CPU_MEMORY_RATIO = 0.2
GPU_HIDDEN, GPU_TOKENS = 4096, (16384, 8192, 4096)  # headline first: the GPU run may be cut short
LAM = 0.1  # as APA's authors ran it


@dataclass(frozen=True)
class Case:
    provider: str
    tokens: int
    hidden: int
    vocab: int
    dtype: str
    op: str = "linear_loss"
    mode: str = "full"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.provider}-{self.tokens}x{self.hidden}x{self.vocab}-{self.dtype}"

    def fields(self) -> dict:
        return asdict(self)


def make_inputs(case: Case, device: str) -> dict:
    """Leaves needing gradients (hidden, weight, bias: logits of a few units) and per-token data; 1 in 8
    tokens masked out (a prompt-free response batch: the fused path's skipping of masked rows barely helps)."""
    dtype, n = DTYPES[case.dtype], case.tokens
    return {
        "hidden": torch.randn(n, case.hidden, device=device, dtype=dtype).requires_grad_(),
        "weight": (torch.randn(case.vocab, case.hidden, device=device) / case.hidden**0.5).to(dtype).requires_grad_(),
        "bias": torch.zeros(case.vocab, device=device, dtype=dtype, requires_grad=True),
        "labels": torch.randint(0, case.vocab, (n,), device=device),
        "ref_logprobs": -9.0 - 4.0 * torch.rand(n, device=device),
        "advantages": torch.randn(n, device=device),
        "mask": torch.arange(n, device=device) % 8 != 0,
    }


def _loss(case: Case, inputs: dict) -> torch.Tensor:
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    data = (inputs["labels"], inputs["ref_logprobs"], inputs["advantages"], inputs["mask"])
    if case.provider == "fused_linear":
        return linear_loss(hidden, weight, *data, bias=bias, lam=LAM)
    logits = hidden @ weight.T + bias
    if case.provider == "matmul+fused":
        return apa_fast.loss(logits, *data, lam=LAM)
    return apa_fast.reference.apa_loss(logits, *data, lam=LAM)


def build_measurement(case: Case, inputs: dict):
    """``(step, setup)``: forward + backward. The gradients are returned, not stored in ``.grad``, so that
    every step allocates (and its peak counts) them afresh."""
    leaves = [inputs[name] for name in ("hidden", "weight", "bias")]

    def step():
        torch.autograd.grad(_loss(case, inputs), leaves)

    return step, tuple


def _record(case: Case, device: str, **measured) -> None:
    append_record(device=device, **case.fields(), **measured)


@pytest.mark.slow
def test_cpu_peak_memory_against_materialised_logits():
    cases = [Case(provider, CPU_TOKENS, CPU_HIDDEN, VOCAB, "float32") for provider in PROVIDERS[:2]]
    peaks = peak_rss_in_subprocess("benchmarks.test_linear", [case.fields() for case in cases], timeout_s=900)
    for case in cases:
        _record(case, "cpu", peak_mem_mb=peaks[case.id])
    fused, materialised = (peaks[case.id] for case in cases)
    print(f"\nCPU peak RSS above inputs, {CPU_TOKENS} x H {CPU_HIDDEN} x V {VOCAB} float32: fused_linear "
          f"{fused:.0f} MiB, matmul+fused {materialised:.0f} MiB (ratio {fused / materialised:.3f})")
    assert fused <= CPU_MEMORY_RATIO * materialised


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", GPU_TOKENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cuda_gptj_lm_head(benchmark, provider, tokens):
    case = Case(provider, tokens, GPU_HIDDEN, VOCAB, "bfloat16")
    inputs = make_inputs(case, "cuda")
    step, setup = build_measurement(case, inputs)
    result = harness.measure(benchmark, step, setup=setup, device="cuda")
    _record(case, "cuda", ms=result["ms"], peak_mem_mb=result["peak_mem_mb"])
    print(f"\n{case.id}: {result['ms']:.2f} ms, {result['peak_mem_mb']:.0f} MiB above inputs")

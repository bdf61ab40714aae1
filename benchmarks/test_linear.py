"""Benchmarks of `apa_fast.linear.linear_loss` (the APA loss from hidden states) against the lm_head matmul
followed by `apa_fast.loss` (materialised logits) and by the unfused reference.

Each case is one forward + backward of the scalar loss (mode "full") with gradients for hidden, weight and
bias (their memory counts in every provider's peak); records carry op "linear_loss" and the hidden size. Providers:

* ``fused_linear``: `apa_fast.linear.linear_loss`;
* ``matmul+fused``: ``apa_fast.loss(hidden @ weight.T + bias, ...)``;
* ``matmul+eager``: the plain eager loss (`benchmarks.baselines`) of ``hidden @ weight.T + bias``: the naive
  full-logits path a trainer runs.

* ``liger`` (where liger-kernel is installed): Liger's chunked fused-linear GRPO loss (`benchmarks.peers`), the
  clipped PPO surrogate rather than APA (the per-token epilogue is a few flops a token beside the matmuls), on
  ``(8, tokens / 8, H)`` hidden states (it chunks by sequence, one at a time).

``chunk_size`` (a case field, None for the default) is passed to ``fused_linear``.

CPU (always): 2,048 and 4,096 tokens x H 1,024 x V 50,400 float32 (one step takes 3-10 s on 2 cores): time
through `benchmarks.harness.measure` and peak resident memory, measured in a fresh process by
`benchmarks.memory`; the default chunk must stay under `CPU_MEMORY_RATIO` of the naive path's peak (issue
21: also at most 0.85 of its time, which a shared machine's timing cannot assert). CUDA (skipped without it):
GPT-J's lm_head, H 4,096 x V 50,400 bf16, 4k-16k tokens: time and peak memory through `benchmarks.harness.measure`.

This module is also the case module `benchmarks.memory` loads (``Case``, ``make_inputs``,
``build_measurement``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch

import apa_fast
from apa_fast.linear import linear_loss
from benchmarks import baselines, harness, peers
from benchmarks.memory import peak_rss_in_subprocess
from benchmarks.records import append_record

PROVIDERS = ("fused_linear", "matmul+fused", "matmul+eager", *(("liger",) if peers.installed("liger_kernel") else ()))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_TOKENS, CPU_HIDDEN, VOCAB = (2048, 4096), 1024, 50400
CPU_MEMORY_RATIO = 0.3
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
    chunk_size: int | None = None

    @property
    def id(self) -> str:
        chunk = "" if self.chunk_size is None else f"-chunk{self.chunk_size}"
        return f"{self.op}-{self.provider}{chunk}-{self.tokens}x{self.hidden}x{self.vocab}-{self.dtype}"

    def fields(self) -> dict:
        """The record fields naming this case (``chunk_size`` only when set)."""
        fields = asdict(self)
        if fields["chunk_size"] is None:
            del fields["chunk_size"]
        return fields


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
    if case.provider == "liger":
        batch = (8, hidden.shape[0] // 8)
        labels, old, adv, mask = (t.view(batch) for t in data)
        return peers.liger_ppo_loss(hidden.view(*batch, -1), weight, labels, old, adv, mask, bias=bias)
    if case.provider == "fused_linear":
        return linear_loss(hidden, weight, *data, bias=bias, lam=LAM, chunk_size=case.chunk_size)
    logits = hidden @ weight.T + bias
    if case.provider == "matmul+fused":
        return apa_fast.loss(logits, *data, lam=LAM)
    return baselines.apa_loss(logits, *data, lam=LAM)


def build_measurement(case: Case, inputs: dict):
    """``(step, setup)``: forward + backward. The gradients are returned, not stored in ``.grad``, so that
    every step allocates (and its peak counts) them afresh."""
    leaves = [inputs[name] for name in ("hidden", "weight", "bias")]

    def step():
        torch.autograd.grad(_loss(case, inputs), leaves)

    return step, tuple


def _record(case: Case, device: str, **measured) -> None:
    append_record(device=device, **case.fields(), **measured)


def _cpu_case(provider: str, tokens: int) -> Case:
    return Case(provider, tokens, CPU_HIDDEN, VOCAB, "float32")


@pytest.fixture(scope="module")
def cpu_peaks(request) -> dict[str, float]:
    """Resident-set peaks (MiB) of the CPU cases this session selected, by case id, from one fresh process."""
    cases = []
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and item.name.startswith("test_cpu_") and "tokens" in params:
            cases += [_cpu_case(p, params["tokens"]) for p in ([params["provider"]] if "provider" in params
                                                                 else PROVIDERS)]
    cases = list(dict.fromkeys(cases))
    return peak_rss_in_subprocess("benchmarks.test_linear", [case.fields() for case in cases], timeout_s=1800)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", CPU_TOKENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_linear_loss(benchmark, provider, tokens, cpu_peaks):
    case = _cpu_case(provider, tokens)
    step, setup = build_measurement(case, make_inputs(case, "cpu"))
    result = harness.measure(benchmark, step, setup=setup, device="cpu", peak_mem_mb=cpu_peaks[case.id])
    _record(case, "cpu", ms=result["ms"], peak_mem_mb=result["peak_mem_mb"], memory_metric="rss_hwm")
    print(f"\n{case.id}: {result['ms']:.0f} ms, {result['peak_mem_mb']:.0f} MiB above inputs")


@pytest.mark.slow
@pytest.mark.parametrize("tokens", CPU_TOKENS)
def test_cpu_memory_against_naive_path(tokens, cpu_peaks):
    fused, naive = (cpu_peaks[_cpu_case(p, tokens).id] for p in ("fused_linear", "matmul+eager"))
    print(f"\nCPU peak RSS above inputs, {tokens} x H {CPU_HIDDEN} x V {VOCAB} float32: fused_linear {fused:.0f} "
          f"MiB, matmul+eager {naive:.0f} MiB (ratio {fused / naive:.3f})")
    assert fused <= CPU_MEMORY_RATIO * naive


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

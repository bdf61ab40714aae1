"""Benchmarks of the fused log-prob ops (`apa_fast.loss`, `apa_fast.logprobs`) against the unfused PyTorch path.

One test per case of `benchmarks.logprob_providers.grid_cases` (headline shape first): median time, peak
memory above the inputs (CUDA allocator peak on a GPU; resident-set peak from a fresh process on a CPU, for
forward+backward), the fraction of the copy bandwidth reached over the bytes the memory floor counts (2L for
forward+backward) and the bytes the provider's design moves (``bytes_by_design``).
A case that runs out of memory is recorded with ``error`` and skipped: that is a result, not a failure.
"""

from __future__ import annotations

import pytest

from benchmarks import harness, memory
from benchmarks import logprob_providers as providers
from benchmarks.records import append_record

PROVIDERS_MODULE = "benchmarks.logprob_providers"


def pytest_generate_tests(metafunc):
    if "logprob_case" in metafunc.fixturenames:
        device = harness.bench_device()
        cases = providers.grid_cases(harness.selected_grid(metafunc.config, device), device)
        metafunc.parametrize("logprob_case", cases, ids=[case.id for case in cases])


def _rss_measured(case: providers.Case) -> bool:
    # torch.compile is left out on a CPU: its C++ compilation would cost as much again as the whole suite.
    return case.mode == "full" and case.provider not in ("eager_compiled", "apa_fast_compiled")


@pytest.fixture(scope="module")
def cpu_peaks(request, device):
    """Resident-set peaks (MiB) of the selected forward+backward cases and the memory target, by case id.

    One fresh process measures them all, and only those the session runs (``-k`` selects fewer).
    """
    if device != "cpu":
        return {}
    cases = []
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and "logprob_case" in params and _rss_measured(params["logprob_case"]):
            cases.append(params["logprob_case"])
        elif item.name == test_cpu_peak_memory_target.__name__:
            cases += providers.memory_target_cases()
    if not cases:
        return {}
    return memory.peak_rss_in_subprocess(PROVIDERS_MODULE, [case.fields() for case in dict.fromkeys(cases)])


def _measure(case, benchmark, device, copy_gbps, cpu_peaks) -> dict | None:
    """The case's figures, or None when it ran out of memory (its tensors are gone once this returns)."""
    try:
        inputs = providers.make_inputs(case, device)
        step, setup = providers.build_measurement(case, inputs)
        return harness.measure(benchmark, step, setup=setup, device=device, floor_bytes=providers.floor_bytes(case),
                               copy_gbps=copy_gbps, peak_mem_mb=cpu_peaks.get(case.id))
    except Exception as exc:
        if harness.is_out_of_memory(exc):
            return None
        raise


def test_logprob_op(logprob_case, benchmark, device, copy_gbps, cpu_peaks):
    case = logprob_case
    reason = providers.unavailable_reason(case, device)
    if reason:
        pytest.skip(reason)
    fields = {**case.fields(), "backend": providers.backend_of(case, device),
              "bytes_by_design": providers.bytes_by_design(case)}
    result = _measure(case, benchmark, device, copy_gbps, cpu_peaks)
    if result is None:
        harness.release_memory(device)
        append_record(device, **fields, error="out of memory")
        pytest.skip(f"out of memory: {case.id}")
    memory_metric = "cuda_max_allocated" if device.startswith("cuda") else "rss_hwm"
    if result["peak_mem_mb"] is None:
        memory_metric = None
    append_record(device, **fields, **result, memory_metric=memory_metric)


def test_cpu_peak_memory_target(device, cpu_peaks):
    """Records the CPU memory target's figures: torch backend vs plain eager, with and without in-place."""
    if device != "cpu":
        pytest.skip("the resident-set target is a CPU figure; on a GPU every case records its CUDA peak")
    for case in providers.memory_target_cases():
        append_record(device, **case.fields(), backend=providers.backend_of(case, device),
                      peak_mem_mb=cpu_peaks[case.id], memory_metric="rss_hwm")
    eager_peak = cpu_peaks[providers.Case("apa_loss", "eager", "full", **providers.CPU_MEMORY_TARGET).id]
    assert eager_peak > 0, "plain eager's forward+backward must allocate: the measurement is broken"

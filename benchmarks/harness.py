"""Measuring shared by every benchmark file: device timing inside pytest-benchmark, peak memory, the floor.

A benchmark describes one measurement as a ``step`` (the timed work) and an optional ``setup`` (untimed work
before each round, returning the step's arguments), then calls `measure`:

    result = measure(benchmark, step, setup=setup, device=device, floor_bytes=2 * logits.nbytes)
    append_record(device, op=..., provider=..., **result)

On CUDA each round is timed with CUDA events around the step and synchronised; on a CPU with
``time.perf_counter``. The first call (compilation, autotuning, allocator warm-up) is never timed; the
median of the timed rounds is reported. pytest-benchmark drives the rounds (``benchmark.pedantic``) so its
own table and ``--benchmark-json`` keep working; with ``--benchmark-disable`` one untimed-grade round runs.
"""

from __future__ import annotations

import functools
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch

MIB = 2**20


def selected_grid(config=None, device: str = "cpu") -> str:
    """"small" or "full": ``--grid`` / ``APA_BENCH_GRID`` when set to one of them, else by device."""
    choice = None
    if config is not None:
        choice = config.getoption("grid", default=None)
    choice = choice or os.environ.get("APA_BENCH_GRID", "auto")
    if choice not in ("auto", "small", "full"):
        raise ValueError(f"--grid / APA_BENCH_GRID must be auto, small or full, got {choice!r}")
    if choice == "auto":
        return "full" if str(device).startswith("cuda") else "small"
    return choice


def bench_device() -> str:
    """"cuda" when a GPU is visible (and APA_BENCH_DEVICE does not say otherwise), else "cpu"."""
    return os.environ.get("APA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class _Stopwatch:
    """Runs the step and keeps its duration in ms; returns None so that no round's output outlives it."""

    def __init__(self, step: Callable, device: str):
        self.step, self.device, self.samples_ms = step, device, []
        self.on_cuda = str(device).startswith("cuda")

    def __call__(self, *args) -> None:
        if self.on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step(*args)
            end.record()
            end.synchronize()
            self.samples_ms.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            self.step(*args)
            self.samples_ms.append((time.perf_counter() - begin) * 1e3)


def _synchronised_setup(setup: Callable | None, device: str) -> Callable:
    """pytest-benchmark's setup protocol: return ``(args, kwargs)``; the device is idle when the round starts."""

    def prepared():
        args = setup() if setup is not None else ()
        synchronize(device)
        return tuple(args), {}

    return prepared


def _round_plan(first_call_ms: float, device: str) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) that fit a per-measurement budget: ~0.2 s on CUDA, ~1.5 s on CPU."""
    if str(device).startswith("cuda"):
        budget_ms, least, most, warmup = 200.0, 10, 100, 3
    else:
        budget_ms, least, most, warmup = 1500.0, 3, 20, 0  # the untimed first call warmed up
    rounds = int(budget_ms / max(first_call_ms, 1e-3))
    return warmup, max(least, min(most, rounds))


def cuda_peak_above_inputs_mib(step: Callable, setup: Callable | None) -> float:
    """Peak ``torch.cuda.max_memory_allocated`` of one setup + step, above what was allocated before (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    args = setup() if setup is not None else ()
    step(*args)
    del args
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def measure(benchmark, step: Callable, *, setup: Callable | None = None, device: str, floor_bytes: int | None = None,
            copy_gbps: float | None = None, peak_mem_mb: float | None = None) -> dict:
    """Time ``step`` (median ms over pytest-benchmark rounds); on CUDA also its peak memory; the floor figures.

    Returns record fields: ms, rounds, peak_mem_mb (measured here on CUDA, else the given value), and, when
    ``floor_bytes`` is given, gbps (floor bytes over the median time), floor_bytes, copy_gbps and
    floor_fraction (gbps over the measured copy bandwidth).
    """
    prepared = _synchronised_setup(setup, device)
    stopwatch = _Stopwatch(step, device)
    stopwatch(*prepared()[0])  # first call: compilation and allocator warm-up, never timed
    if str(device).startswith("cuda"):
        peak_mem_mb = cuda_peak_above_inputs_mib(step, setup)
    warmup, rounds = _round_plan(stopwatch.samples_ms[0], device)
    stopwatch.samples_ms.clear()
    benchmark.pedantic(stopwatch, setup=prepared, rounds=rounds, warmup_rounds=warmup)
    timed = stopwatch.samples_ms[warmup:] or stopwatch.samples_ms  # --benchmark-disable runs a single round
    result = {"ms": statistics.median(timed), "rounds": len(timed), "peak_mem_mb": peak_mem_mb}
    result.update(floor_fields(floor_bytes, result["ms"], copy_gbps))
    benchmark.extra_info.update({k: v for k, v in result.items() if v is not None})
    return result


def floor_fields(floor_bytes: int | None, ms: float, copy_gbps: float | None) -> dict:
    """Achieved bandwidth over the bytes the memory floor counts, and its fraction of the copy bandwidth."""
    if not floor_bytes or not ms:
        return {}
    gbps = floor_bytes / (ms * 1e-3) / 1e9
    fields = {"gbps": gbps, "floor_bytes": floor_bytes}
    if copy_gbps:
        fields.update(copy_gbps=copy_gbps, floor_fraction=gbps / copy_gbps)
    return fields


@functools.cache
def copy_bandwidth_gbps(device: str) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written (median of timed copies).

    1 GiB on CUDA (far above any L2), 256 MiB on a CPU. Measured once per process.
    """
    on_cuda = str(device).startswith("cuda")
    nbytes = (1 if on_cuda else 0.25) * 2**30
    source = torch.randint(0, 2**15, (int(nbytes) // 2,), dtype=torch.int16, device=device)  # never zeros
    target = torch.empty_like(source)
    stopwatch = _Stopwatch(lambda: target.copy_(source), device)
    for _ in range(25 if on_cuda else 7):
        stopwatch()
    median_ms = statistics.median(stopwatch.samples_ms[2:])
    return 2 * source.nbytes / (median_ms * 1e-3) / 1e9


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and for a CPU allocation failure."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "not enough memory" in str(exc).lower()


def release_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

"""Benchmark session set-up: the grid, the device, its copy bandwidth.

``pytest benchmarks/`` measures on a GPU when one is visible (the full grid) and on the CPU otherwise (a
small grid that runs in about a minute). ``--grid small|full`` or ``APA_BENCH_GRID`` overrides the choice;
``APA_BENCH_DEVICE=cpu`` forces the CPU. Every measurement is appended to ``benchmarks/results/<device>.jsonl``
(see `benchmarks.records`); ``python -m benchmarks.report`` turns those into tables and plots.

The Triton kernels must compile for the GPU here, so this file never turns the interpreter on (the unit
tests' conftest does): run the benchmarks in their own pytest session, with ``TRITON_INTERPRET`` unset or 0.
"""

import os

# Triton 3.9 warns that its FP-fusion default changes in 3.10: pin it as the unit tests do.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from benchmarks import harness, records  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--grid", choices=("auto", "small", "full"), default=None,
                     help="benchmark grid: small (CPU sizes), full (the GPU grid); default auto: by device "
                          "(or APA_BENCH_GRID)")


def pytest_report_header(config):
    device = harness.bench_device()
    return [f"apa_fast benchmarks: device {records.device_name(device)}, grid {harness.selected_grid(config, device)}, "
            f"records -> {records.results_path(device)}"]


@pytest.fixture(scope="session")
def device() -> str:
    return harness.bench_device()


@pytest.fixture(scope="session")
def grid(request, device) -> str:
    return harness.selected_grid(request.config, device)


@pytest.fixture(scope="session")
def copy_gbps(device) -> float:
    """The device's measured copy bandwidth (read + write), once per session: the floor fractions' unit."""
    return harness.copy_bandwidth_gbps(device)

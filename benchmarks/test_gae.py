"""Benchmarks of `apa_fast.gae` against the per-timestep loop trainers use (`apa_fast.reference.gae_loop`).

Providers: ``apa_fast`` (``backend`` "cpu"/"cuda": the compiled kernel; "torch": the loop-free PyTorch path;
``variant`` "whiten" adds whitening), ``torch`` (the loop) and the GAE functions of verl 0.9.1 and OpenRLHF
0.11.2 (``verl``, ``openrlhf``: `benchmarks.peers`, their per-timestep loops, without verl's whitening).
Right-padded float32 rows, as a rollout
produces them. The memory floor counts reading rewards, values and the mask and writing advantages and
returns once: 17 bytes a position. CPU grid: B=256, T=1024; GPU grid: up to 2048 x 8192.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from apa_fast import _dispatch
from apa_fast.gae import gae
from apa_fast.reference import gae_loop
from benchmarks import harness, peers
from benchmarks.records import append_record

SHAPES = {
    "small": [(256, 1024)],
    # (512, 1024): the GPU target shape (>= 100x the loop on an H100).
    "full": [(256, 1024), (512, 1024), (4096, 1024), (64, 4096), (8, 16384), (2048, 8192)],
}
FLOOR_BYTES_PER_POSITION = 4 + 4 + 1 + 4 + 4
GAMMA, LAM = 1.0, 0.95


@dataclass(frozen=True)
class Case:
    rows: int
    cols: int
    provider: str  # "apa_fast", "torch" (the loop) or a peer of `benchmarks.peers.GAE`
    backend: str | None = None
    whiten: bool = False

    @property
    def id(self) -> str:
        name = self.provider if self.backend is None else f"{self.provider}-{self.backend}"
        return f"{self.rows}x{self.cols}-{name}" + ("-whiten" if self.whiten else "")


def grid_cases(grid: str, device: str) -> list[Case]:
    kernel = "cuda" if device.startswith("cuda") else "cpu"
    cases = []
    for rows, cols in SHAPES[grid]:
        cases += [Case(rows, cols, "torch"), *(Case(rows, cols, name) for name in peers.GAE),
                  Case(rows, cols, "apa_fast", kernel),
                  Case(rows, cols, "apa_fast", kernel, whiten=True), Case(rows, cols, "apa_fast", "torch")]
    return cases


def pytest_generate_tests(metafunc):
    if "gae_case" in metafunc.fixturenames:
        device = harness.bench_device()
        cases = grid_cases(harness.selected_grid(metafunc.config, device), device)
        metafunc.parametrize("gae_case", cases, ids=[case.id for case in cases])


def right_padded_inputs(rows: int, cols: int, device: str):
    rewards = torch.randn(rows, cols, device=device)
    values = torch.randn(rows, cols, device=device)
    lengths = torch.randint(cols // 2, cols + 1, (rows, 1), device=device)
    mask = torch.arange(cols, device=device) < lengths
    return rewards, values, mask


def test_gae(gae_case, benchmark, device, copy_gbps):
    case = gae_case
    if case.backend is not None:
        try:
            _dispatch.pick_gae_backend(case.backend, torch.device(device))
        except RuntimeError as exc:
            pytest.skip(str(exc))
    rewards, values, mask = right_padded_inputs(case.rows, case.cols, device)
    if case.provider == "torch":
        step = lambda: gae_loop(rewards, values, mask, gamma=GAMMA, lam=LAM)
    elif case.provider in peers.GAE:
        float_mask = mask.float()  # as their trainers pass it
        step = lambda: peers.GAE[case.provider](rewards, values, float_mask, gamma=GAMMA, lam=LAM)
    else:
        step = lambda: gae(rewards, values, mask, gamma=GAMMA, lam=LAM, whiten=case.whiten, backend=case.backend)
    tokens = case.rows * case.cols
    result = harness.measure(benchmark, step, device=device, floor_bytes=FLOOR_BYTES_PER_POSITION * tokens,
                             copy_gbps=copy_gbps)
    append_record(device, op="gae", provider=case.provider, backend=case.backend,
                  variant="whiten" if case.whiten else None, mode="forward", tokens=tokens, dtype="float32",
                  B=case.rows, T=case.cols, **result)

"""Test set-up: Triton's interpreter for CPU tensors, fresh random seeds, shared numeric helpers."""

import os

# Must be set before any module defining @triton.jit kernels is imported (it is read at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns that its default for FP fusion changes in 3.10: pin it so results do not drift.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test draws fresh random inputs; the seed is printed on failure (APA_FAST_TEST_SEED replays it)."""
    seed = int(os.environ.get("APA_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.fixture(autouse=True)
def first_upstream_guess(monkeypatch):
    """Each test starts as a fresh process does: training mode writes its first gradient for an upstream gradient
    of 1 (`apa_fast.logprob.UPSTREAM_GUESS`, which the previous test's backward would otherwise have set)."""
    from apa_fast import logprob

    monkeypatch.setattr(logprob.UPSTREAM_GUESS, "value", 1.0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [value for key, value in item.user_properties if key == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with APA_FAST_TEST_SEED={seeds[0]}"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, scale, 1e-6) in float64; NaN or inf anywhere gives inf.

    The 1e-6 floor makes an expected value that is exactly 0 in exact arithmetic (a one-word vocabulary's
    gradient, 7e-15 after float64 rounding) compare absolutely rather than divide rounding noise by itself.
    ``scale`` is the magnitude of the terms a reduced value sums: a sum of terms that cancel is only as
    accurate as its terms, relative to them.
    """
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return (actual - expected).norm().item() / max(expected.norm().item(), scale, 1e-6)


def assert_close_rel(actual, expected, tol, what, scale=0.0):
    err = rel_err(actual, expected, scale)
    if not err <= tol:
        worst = (actual.double() - expected.double()).abs().flatten()
        idx = int(worst.argmax()) if worst.numel() else 0
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst element #{idx}: "
            f"{actual.flatten()[idx].item() if worst.numel() else None} vs "
            f"{expected.flatten()[idx].item() if worst.numel() else None}"
        )
    return err

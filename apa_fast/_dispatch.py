"""The one place that decides which implementation runs: Triton kernels, the compiled extension, or PyTorch.

Every optional dependency is probed lazily, once, and the reason for an absence is kept so that
`python -m apa_fast.info` and the errors of an explicit ``backend=`` request can explain it.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

LOSS_BACKENDS = ("auto", "triton", "torch")
GAE_BACKENDS = ("auto", "cuda", "cpu", "torch")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(importable, reason): whether `triton` imports, and the version or the import error."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def _triton_unavailable_reason(device: torch.device) -> str | None:
    ok, reason = triton_status()
    if not ok:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return (
            "the Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
            "before apa_fast is imported, or use backend='torch'"
        )
    return f"the Triton kernels do not support device type {device.type!r}"


def pick_loss_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` for the fused log-prob losses on tensors living on ``device``.

    "auto" picks Triton on CUDA tensors (when Triton imports) and the chunked PyTorch path elsewhere.
    An explicit backend that cannot run raises RuntimeError with the reason; an unknown one ValueError.
    """
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = _triton_unavailable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and reason is None else "torch"


def _gae_kernel_unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the compiled GAE kernels do not support device type {device.type!r}"
    module = extension()
    if module is None:
        return extension_error()
    if device.type == "cuda" and not module.with_cuda:
        return ("apa_fast._C was built without its CUDA kernel (torch was a CPU build or nvcc was missing at "
                "install time): reinstall with a CUDA torch and nvcc, or use backend='torch'")
    return None


def pick_gae_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` for `apa_fast.gae` on tensors living on ``device``.

    "auto" picks the compiled kernel of the tensors' device ("cuda" or "cpu") when it loaded, else the
    PyTorch path. An explicit backend that cannot run raises RuntimeError with the reason (a device that is
    not the backend's included); an unknown one ValueError.
    """
    if backend not in GAE_BACKENDS:
        raise ValueError(f"backend must be one of {GAE_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = _gae_kernel_unavailable_reason(device)
    if backend == "auto":
        return device.type if reason is None else "torch"
    if device.type != backend:
        raise RuntimeError(f"backend={backend!r} runs on {backend} tensors, got tensors on {device}")
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
    return backend


@functools.cache
def extension():
    """The compiled extension module `apa_fast._C` (GAE ops), or None; see `extension_error()`."""
    if os.environ.get("APA_FAST_NO_EXT", "0") not in ("", "0"):
        return None
    try:
        return importlib.import_module("apa_fast._C")
    except Exception:
        return None


@functools.cache
def extension_error() -> str | None:
    """Why the compiled extension is not loaded (None when it is)."""
    if os.environ.get("APA_FAST_NO_EXT", "0") not in ("", "0"):
        return "disabled by APA_FAST_NO_EXT=1"
    try:
        importlib.import_module("apa_fast._C")
    except Exception as exc:
        return (
            f"apa_fast._C did not load ({type(exc).__name__}: {exc}); reinstall with "
            "`pip install --no-build-isolation .` and a C++ compiler to build it"
        )
    return None

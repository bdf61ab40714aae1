"""The one place that decides which implementation runs: Triton kernels, the compiled extension, or PyTorch.

Every optional dependency is probed lazily, once, and the reason for an absence is kept so that
`python -m apa_fast.info` and the errors of an explicit ``backend=`` request can explain it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
import types

import torch

from . import _ext_build

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


# A constant under torch.compile: evaluated once at trace time, not traced (it probes imports and caches).
@torch.compiler.assume_constant_result
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


def _gae_kernel_unavailable_reason(device_type: str, build: bool) -> str | None:
    if device_type not in ("cpu", "cuda"):
        return f"the compiled GAE kernels do not support device type {device_type!r}"
    status = extension_status(build=False)
    if status.origin == "not built":
        # Build only what can serve this device: a build without the CUDA kernel is no use to CUDA tensors.
        cuda_unbuildable = device_type == "cuda" and _ext_build.plan().no_cuda_reason
        if cuda_unbuildable:
            return f"apa_fast._C is not installed and its CUDA kernel cannot be built here: {cuda_unbuildable}"
        if build:
            status = extension_status(build=True)
    if status.module is None:
        return status.reason()
    if device_type == "cuda" and not status.module.with_cuda:
        return (f"apa_fast._C ({status.origin}) was built without its CUDA kernel (torch was a CPU build or nvcc "
                "was missing when it was built): rebuild it with a CUDA torch and nvcc, or use backend='torch'")
    return None


def pick_gae_backend(backend: str, device: torch.device, *, build: bool = True) -> str:
    """Resolve ``backend`` for `apa_fast.gae` on tensors living on ``device``.

    "auto" picks the compiled kernel of the tensors' device ("cuda" or "cpu") when it is available, else the
    PyTorch path (with one line on stderr, once a process, when that is because a build failed or the build cache
    cannot be used); "auto", "cpu" and "cuda" build the extension just in time when it is not installed, or its
    cached build is stale, and it can be built for the device (``build=False`` only looks). An explicit backend
    that cannot run raises RuntimeError with the reason (a device that is not the backend's included); an
    unknown one ValueError.
    """
    if backend not in GAE_BACKENDS:
        raise ValueError(f"backend must be one of {GAE_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend != "auto" and device.type != backend:
        raise RuntimeError(f"backend={backend!r} runs on {backend} tensors, got tensors on {device}")
    reason = _gae_kernel_unavailable_reason(device.type, build)
    if backend == "auto":
        if reason is not None and build:
            _report_fallback()
        return device.type if reason is None else "torch"
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}")
    return backend


_fallback_reported = False


def _report_fallback() -> None:
    """One line on stderr, once a process, when "auto" runs GAE on PyTorch because the extension failed (not
    when it is switched off or cannot serve the device): a print, not a warning, which ``-W error`` would make
    the crash that falling back avoids."""
    global _fallback_reported
    status = extension_status(build=False)
    if status.origin in ("failed build", "cache unusable") and not _fallback_reported:
        _fallback_reported = True
        print(f"apa_fast: gae(backend='auto') runs on PyTorch: {status.summary()}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    """Where the compiled extension came from, or why there is none.

    origin: "installed" (`apa_fast._C`, built by `pip install --no-build-isolation`), "cached build" (built
    just in time, by this process or an earlier one), "failed build" (or a cached build that did not load),
    "cache unusable" (the build cache cannot be created, locked, read or written), "disabled"
    (APA_FAST_NO_EXT=1), or "not built" (nothing installed or cached yet, or a stale cached build; seen only when
    asked not to build). path: the module's file, or the build directory when there is no module. detail: the
    compiler's output for a failed build, what is wrong with the cache, what would be built (and why a cached
    build is stale) for "not built", why an installed `apa_fast._C` was passed over, else "".
    """

    module: types.ModuleType | None
    origin: str
    path: str | None = None
    detail: str = ""

    def reason(self) -> str:
        """Why there is no module, for error messages (a compiler's output cut to its last lines)."""
        if self.origin == "disabled":
            return "the compiled extension is disabled by APA_FAST_NO_EXT=1"
        if self.origin == "failed build":
            tail = "\n".join(self.detail.rstrip().splitlines()[-20:])
            return f"{self.summary()}:\n{tail}"
        if self.origin == "cache unusable":
            return f"apa_fast._C is not installed and {self.detail}"
        return f"apa_fast._C is not built yet: {self.detail}"

    def summary(self) -> str:
        """`reason()` in one line: a failed build's compiler output is left to `python -m apa_fast.info`."""
        if self.origin == "failed build":
            return (f"apa_fast._C is not installed and building it in {self.path} failed (`python -m apa_fast.info` "
                    "shows why, `python -m apa_fast.build` retries)")
        return self.reason()


_status: ExtensionStatus | None = None


def extension_status(build: bool = True) -> ExtensionStatus:
    """The compiled extension: the installed `apa_fast._C` if it imports, else the cached just-in-time build,
    built now (one line on stderr, about a minute) when there is none and ``build``. Resolved once a process
    (a failed build included); only "not built" is looked at again."""
    global _status
    if _status is None or (_status.origin == "not built" and build):
        _status = _find_extension(build)
        if _status.module is not None:
            _register_gae_fake()
    return _status


def _register_gae_fake() -> None:
    """Give `apa_fast::gae` its fake kernel (output shapes and dtypes without running it), which
    torch.compile and FakeTensor tracing need, once the library defining the op has loaded."""
    from .gae import gae_fake  # gae.py imports this module at its top: imported here, at first load

    torch.library.register_fake("apa_fast::gae", gae_fake)


def _find_extension(build: bool) -> ExtensionStatus:
    if os.environ.get("APA_FAST_NO_EXT", "0") not in ("", "0"):
        return ExtensionStatus(None, "disabled")
    try:
        module = importlib.import_module("apa_fast._C")
        return ExtensionStatus(module, "installed", module.__file__)
    except ModuleNotFoundError:  # the usual case after a build-isolated `pip install .`
        passed_over = ""
    except Exception as exc:  # e.g. an undefined symbol after torch was upgraded under it
        passed_over = f"the installed apa_fast._C did not load ({type(exc).__name__}: {exc})"
    build_plan = _ext_build.plan()
    directory = str(build_plan.directory)
    try:
        module = _ext_build.load(build_plan, build=build)
        if module is None:
            return _not_built(build_plan, passed_over)
    except _ext_build.BuildFailed as exc:
        return ExtensionStatus(None, "failed build", directory, "\n".join(filter(None, [str(exc), passed_over])))
    except _ext_build.CacheUnusable as exc:
        return ExtensionStatus(None, "cache unusable", directory, "; ".join(filter(None, [str(exc), passed_over])))
    return ExtensionStatus(module, "cached build", module.__file__, passed_over)


def _not_built(build_plan: _ext_build.BuildPlan, passed_over: str) -> ExtensionStatus:
    """Nothing usable cached, seen without building: what the first call would build, or why it cannot."""
    directory = str(build_plan.directory)
    current, stale = _ext_build.examine(build_plan)
    problem = _ext_build.cache_problem(build_plan)
    if problem:
        return ExtensionStatus(None, "cache unusable", directory, "; ".join(filter(None, [problem, passed_over])))
    stale = f"the cached build is stale ({stale})" if current == "stale" else ""
    plan_text = (f"the first call that needs it builds {build_plan.describe()} into {directory}, or run "
                 "`python -m apa_fast.build`")
    return ExtensionStatus(None, "not built", directory, "; ".join(filter(None, [stale, plan_text, passed_over])))


def extension():
    """The compiled extension module (GAE ops), built just in time if need be, or None; see `extension_error()`."""
    return extension_status().module


def extension_error() -> str | None:
    """Why the compiled extension is not loaded (None when it is)."""
    status = extension_status()
    return None if status.module is not None else status.reason()

"""Just-in-time build of the compiled extension from the C++/CUDA sources shipped inside the package.

A plain `pip install .` builds in an isolated environment that cannot see the user's torch, so it installs no
`apa_fast._C` (and a wheel built against one torch breaks on another). The sources ship as package data
instead, and the first call that needs the kernel builds them with `torch.utils.cpp_extension.load` against
the torch actually installed. The build goes to a per-user cache directory named by a hash of everything that
makes a build incompatible (`BuildPlan.key`), under a file lock so that concurrent processes (DeepSpeed ranks)
build once; later processes import the finished module straight from there, without a compiler or ninja.

A directory holds one of: a finished build (the manifest `key.json`, written atomically after the module: the
key, and the module's size and sha256), a failed one (`build-error.txt`, the compiler's output: later processes
fall back to PyTorch without retrying; `python -m apa_fast.build` retries), or an interrupted one (rebuilt from
scratch by the next process). A module that does not match its manifest (a torn copy on a shared filesystem, a
file changed since, a build from before manifests) is stale: it is never loaded (a truncated one would kill the
process with SIGBUS inside dlopen) and is rebuilt like an interrupted one. A cache that cannot be created, locked,
read or written raises CacheUnusable, which the dispatcher turns into the PyTorch path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import types
from pathlib import Path
from unittest import mock

import torch

MODULE_NAME = "apa_fast_C"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
# The architectures setup.py builds for by default: SASS for Ampere and Hopper, PTX for later GPUs.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CXX_FLAGS = ("-O3", "-fopenmp")
NVCC_FLAGS = ("-O3",)
LD_FLAGS = ("-fopenmp",)
# The name predates the size and hash: an older apa_fast reading this cache still finds its finished builds.
MANIFEST_FILE = "key.json"
ERROR_FILE = "build-error.txt"


class BuildFailed(RuntimeError):
    """The extension did not build (or a finished build did not load); the message is the compiler's output."""


class CacheUnusable(RuntimeError):
    """The build cache cannot be created, locked, read or written here; the message names it and the error."""


def source_dir() -> Path:
    """The C++/CUDA sources: package data in an installed wheel, the repository's csrc/ in a checkout."""
    installed = Path(__file__).with_name("csrc")
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "csrc"


def cache_root() -> Path:
    """``$APA_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/apa_fast`` (``~/.cache/apa_fast``)."""
    if os.environ.get("APA_FAST_CACHE_DIR"):
        return Path(os.environ["APA_FAST_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apa_fast"


def source_digest(directory: Path) -> str:
    """sha256 over the names and contents of every source file in ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What a build here would compile, and against what; `key` names its cache directory."""

    sources: Path
    source_digest: str
    torch_version: str
    cxx11_abi: bool
    python: str  # the extension-module suffix: interpreter, version, ABI flags and platform
    cuda: str | None  # torch's CUDA version when the CUDA kernel is built, else None
    cuda_archs: str | None
    no_cuda_reason: str | None  # why the CUDA kernel is left out (None when it is built)

    @property
    def key(self) -> dict:
        fields = ("source_digest", "torch_version", "cxx11_abi", "python", "cuda", "cuda_archs")
        flags = {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS, "ld": LD_FLAGS}
        return {**{name: getattr(self, name) for name in fields}, "flags": flags}

    @property
    def directory(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        return cache_root() / digest[:16]

    def describe(self) -> str:
        kernels = "the C++ CPU kernel"
        if self.cuda:
            kernels = f"the C++ CPU and CUDA kernels (CUDA {self.cuda}, archs {self.cuda_archs})"
        return f"apa_fast._C ({kernels}) for torch {self.torch_version}"


@functools.cache
def plan() -> BuildPlan:
    """The build for this interpreter, torch and toolkit (the CUDA kernel when torch is a CUDA build and nvcc
    is found; architectures from APA_FAST_CUDA_ARCHS, default 8.0;9.0+PTX). Worked out once a process."""
    from torch.utils import cpp_extension

    no_cuda_reason = None
    if not torch.version.cuda:
        no_cuda_reason = f"torch {torch.__version__} is a CPU build"
    elif cpp_extension.CUDA_HOME is None:
        no_cuda_reason = "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    with_cuda = no_cuda_reason is None
    sources = source_dir()
    return BuildPlan(
        sources=sources,
        source_digest=source_digest(sources),
        torch_version=torch.__version__,
        cxx11_abi=bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        python=sysconfig.get_config_var("EXT_SUFFIX"),
        cuda=torch.version.cuda if with_cuda else None,
        cuda_archs=os.environ.get("APA_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS) if with_cuda else None,
        no_cuda_reason=no_cuda_reason,
    )


def examine(build_plan: BuildPlan) -> tuple[str, str]:
    """(state, detail) of the cache directory of ``build_plan``, without loading anything:

    "built" (a manifest of this plan whose module has the recorded size and sha256: safe to dlopen), "stale" (a
    manifest the module or the plan does not match; detail: what differs), "failed" (detail: the compiler's
    output) or "absent" (nothing yet, or an interrupted build). Raises CacheUnusable if the cache cannot be read.
    """
    directory = build_plan.directory
    with _cache_access(build_plan):
        if (directory / MANIFEST_FILE).exists():
            stale = _stale_reason(build_plan)
            return ("stale", stale) if stale else ("built", "")
        if (directory / ERROR_FILE).exists():
            return "failed", (directory / ERROR_FILE).read_text(errors="replace")
    return "absent", ""


def state(build_plan: BuildPlan) -> str:
    """"built", "stale", "failed" or "absent": see `examine`."""
    return examine(build_plan)[0]


def load(build_plan: BuildPlan, *, build: bool = True) -> types.ModuleType | None:
    """The cached module of ``build_plan``, built first (under the lock) if there is none or it is stale and
    ``build``; None if there is none and not ``build``. Raises BuildFailed if the build failed, now or in an
    earlier process, or the module did not load; CacheUnusable if the cache cannot be used."""
    current, detail = examine(build_plan)
    if current in ("absent", "stale") and build:
        with _cache_access(build_plan), _lock(build_plan):
            current, detail = examine(build_plan)  # another process may have finished while this one waited
            if current in ("absent", "stale"):
                return _compile(build_plan, detail)
    if current == "built":
        return _import(build_plan)
    if current == "failed":
        raise BuildFailed(detail)
    return None


def build(build_plan: BuildPlan, *, force: bool = False) -> bool:
    """Build ``build_plan`` unless a finished build that loads is cached (``force``: even then): a failed, stale or
    unloadable build is rebuilt. True when it compiled. Raises BuildFailed or CacheUnusable as `load` does."""
    with _cache_access(build_plan), _lock(build_plan):
        current, detail = examine(build_plan)
        why = {"stale": detail, "failed": "retrying a failed build"}.get(current, "")
        if current == "built" and not force:
            try:
                _import(build_plan)
                return False
            except BuildFailed as exc:  # its manifest matches, but e.g. a library it links against is gone
                why = f"the cached build did not load: {exc.__cause__}"
        _compile(build_plan, why)
    return True


def module_path(build_plan: BuildPlan) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return build_plan.directory / f"{MODULE_NAME}{LIB_EXT}"


def cache_problem(build_plan: BuildPlan) -> str | None:
    """Why no build could be written into the cache here (None when one could), found without building: the
    cache root is created, as a build would create it, then checked to be writable."""
    root = build_plan.directory.parent
    try:
        with _cache_access(build_plan):
            root.mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable", str(root))
    except CacheUnusable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _cache_access(build_plan: BuildPlan):
    """OSError from creating, locking, reading or writing the cache (a read-only HOME, a path under a regular
    file, a cache path that is a file) as CacheUnusable, naming the directory and what to do."""
    try:
        yield
    except OSError as exc:
        raise CacheUnusable(f"the build cache {build_plan.directory} cannot be used ({type(exc).__name__}: {exc}): "
                            "set APA_FAST_CACHE_DIR to a writable directory") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stale_reason(build_plan: BuildPlan) -> str | None:
    """What about the manifest or the module does not match (None when nothing: the module is the file that
    was built). Size first, from a stat: a torn copy is refused without reading it."""
    directory = build_plan.directory
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        key, size, sha256 = manifest["key"], manifest["module_size"], manifest["module_sha256"]
    except (ValueError, KeyError, TypeError):  # not JSON, or an older apa_fast's bare key: nothing to check by
        return f"{directory / MANIFEST_FILE} records no size and sha256 of the module (an older apa_fast, or torn)"
    if key != json.loads(json.dumps(build_plan.key)):
        return f"{directory / MANIFEST_FILE} records the build of another configuration"
    path = module_path(build_plan)
    if not path.exists():
        return f"{path} is missing"
    if path.stat().st_size != size:
        return f"{path} is {path.stat().st_size} bytes where its manifest records {size} (a torn or changed copy)"
    if _sha256(path) != sha256:
        return f"{path} does not have the sha256 its manifest records (a changed or corrupt copy)"
    return None


def _lock(build_plan: BuildPlan):
    from filelock import FileLock

    build_plan.directory.parent.mkdir(parents=True, exist_ok=True)
    # Beside the build directory, not in it: a rebuild deletes the directory while holding the lock.
    return FileLock(str(build_plan.directory) + ".lock")


def _compile(build_plan: BuildPlan, why: str = "") -> types.ModuleType:
    """Build into a fresh directory (the caller holds the lock), recording success (the manifest) or the
    compiler's output; ``why``: what was wrong with the build there, for the one line on stderr."""
    from torch.utils import cpp_extension

    directory = build_plan.directory
    # Whatever is there is a failed, interrupted, stale or unwanted build: torch's own lock file left by a killed
    # build would otherwise make this one wait forever. Not ignore_errors: a directory that cannot be emptied
    # is a cache that cannot be used.
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    print(f"apa_fast: building {build_plan.describe()} into {directory} (one time{'; ' + why if why else ''})",
          file=sys.stderr, flush=True)
    sources = [build_plan.sources / "gae_binding.cpp"]
    defines = []
    if build_plan.cuda:
        sources.append(build_plan.sources / "gae_cuda.cu")
        defines = ["-DAPA_FAST_WITH_CUDA"]
    try:
        with mock.patch.dict(os.environ, _build_environment(build_plan)):  # restored after the build
            module = cpp_extension.load(
                name=MODULE_NAME, sources=[str(path) for path in sources], build_directory=str(directory),
                extra_cflags=[*CXX_FLAGS, *defines], extra_cuda_cflags=[*NVCC_FLAGS, *defines],
                extra_ldflags=list(LD_FLAGS), with_cuda=bool(build_plan.cuda), verbose=False)
    except Exception as exc:  # compiler, linker, ninja and toolkit-version errors come as several types
        message = f"{type(exc).__name__}: {exc}"
        (directory / ERROR_FILE).write_text(message)
        raise BuildFailed(message) from exc
    _write_manifest(build_plan)
    return module


def _write_manifest(build_plan: BuildPlan) -> None:
    """Record the finished build: its key, and the size and sha256 of its module as it is now."""
    path = module_path(build_plan)
    manifest = {"key": build_plan.key, "module_size": path.stat().st_size, "module_sha256": _sha256(path)}
    manifest_file = build_plan.directory / MANIFEST_FILE
    manifest_file.with_suffix(".tmp").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    manifest_file.with_suffix(".tmp").replace(manifest_file)  # atomic: a reader sees a finished build or none


def _build_environment(build_plan: BuildPlan) -> dict[str, str]:
    """PATH with the `ninja` wheel's binary (a venv that is not activated has it off PATH) and the CUDA
    architectures, which torch.utils.cpp_extension reads from TORCH_CUDA_ARCH_LIST."""
    environment = {}
    try:
        import ninja

        environment["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:  # a system ninja on PATH works as well
        pass
    if build_plan.cuda_archs:
        environment["TORCH_CUDA_ARCH_LIST"] = build_plan.cuda_archs
    return environment


def _import(build_plan: BuildPlan) -> types.ModuleType:
    """Load the module of a build that `examine` found "built" (the file its manifest describes)."""
    path = module_path(build_plan)
    try:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:
        raise BuildFailed(f"the cached build {path} did not load ({type(exc).__name__}: {exc}); "
                          "`python -m apa_fast.build` rebuilds it") from exc
    return module

"""Build script: the Python package, the C++/CUDA sources (csrc/, shipped as `apa_fast/csrc`), and the
extension built from them when torch is importable here.

`apa_fast._C` is the C++ CPU kernel, plus the CUDA kernel when torch is a CUDA build and nvcc is found
(architectures from APA_FAST_CUDA_ARCHS, default "8.0;9.0+PTX"). It builds only when torch is importable at
build time, i.e. with `pip install --no-build-isolation .` after torch; a plain `pip install .` builds in an
isolated environment without torch and installs the sources alone, and the package then builds the
extension just in time on first use (apa_fast/_ext_build.py). Skipped (APA_FAST_NO_EXT=1) or failed, the
package still installs; `python -m apa_fast.info` says where the extension came from, or why there is none.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

# kernels/ (Triton device code) is installed as apa_fast.kernels: a top-level package named
# `kernels` would shadow Hugging Face's `kernels` package. csrc/ is installed as apa_fast/csrc (package data,
# see pyproject.toml) for the just-in-time build.
PACKAGES = find_packages(include=["apa_fast", "apa_fast.*"]) + ["apa_fast.kernels", "apa_fast.csrc"]
PACKAGE_DIR = {"apa_fast": "apa_fast", "apa_fast.kernels": "kernels", "apa_fast.csrc": "csrc"}


def optional(build_ext_class):
    """`build_ext_class` with failures turned into a warning: the pure-PyTorch library installs anyway."""

    class OptionalBuildExt(build_ext_class):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler errors surface as several unrelated exception types
                warnings.warn(f"apa_fast: the compiled extension failed to build ({exc}); it is tried again "
                              "just in time on first use", stacklevel=1)

    return OptionalBuildExt


def compiled_extension():
    """(ext_modules, cmdclass) building apa_fast._C, or nothing when it is switched off or torch is missing."""
    if os.environ.get("APA_FAST_NO_EXT", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        warnings.warn(f"apa_fast: torch is not importable at build time ({exc}): the extension builds on first "
                      "use instead (or `python -m apa_fast.build`); to build it now, install torch first, then "
                      "`pip install --no-build-isolation .`", stacklevel=1)
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))  # nvcc jobs take GBs each
    options = {
        "sources": ["csrc/gae_binding.cpp"],
        "depends": glob.glob("csrc/*.h") + glob.glob("csrc/*.cuh"),
        "extra_compile_args": {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]},
        "extra_link_args": ["-fopenmp"],
    }
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("APA_FAST_CUDA_ARCHS", "8.0;9.0+PTX")
        options["sources"].append("csrc/gae_cuda.cu")
        extension = cpp_extension.CUDAExtension("apa_fast._C", define_macros=[("APA_FAST_WITH_CUDA", None)],
                                                **options)
    else:
        extension = cpp_extension.CppExtension("apa_fast._C", **options)
    return [extension], {"build_ext": optional(cpp_extension.BuildExtension)}


EXT_MODULES, CMDCLASS = compiled_extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)

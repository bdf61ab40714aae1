"""Checks of the CUDA GAE kernel that need no GPU.

* It compiles for Hopper (sm_90) without spilling registers: `csrc/gae_cuda.cu` includes no torch headers,
  so nvcc compiles it alone and `-Xptxas -v` reports each kernel's registers, stack frame and spill bytes.
  Skipped when nvcc is not installed.
* Its results match the float64 oracle when it runs on the host (`cuda_emulation/gae_cuda_emulation.cpp`:
  every CUDA thread an OS thread, barriers and warp shuffles real), for every row-group size, mask layout,
  whitening and input dtype. This runs the kernel's indexing, scans and barriers as written, but cannot prove the
  absence of races (a missing barrier may go unnoticed) or say anything about speed: the `cuda`-marked tests
  in test_gae.py do that on a GPU. Skipped without g++ or the CUDA headers.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_close_rel
from oracles import gae_inputs as make_inputs
from oracles import gae_mask as make_mask
from oracles import gae_oracle as oracle
from oracles import gae_returns_scale
from oracles import gae_tolerance as tolerance

CSRC = Path(__file__).resolve().parents[1] / "csrc"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"  # test-only: the package does not ship it
CUDA_SOURCE = CSRC / "gae_cuda.cu"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
ARCH = "sm_90"
# torch.utils.cpp_extension compiles .cu files with these: without their conversion operators, the 16-bit
# types must be widened with intrinsics, and this build checks that the kernel does so.
TORCH_BUILD_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                       "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# 4 input types x 4 row-group sizes x whitening on/off, plus the whitening rescale for float and double.
EXPECTED_KERNELS = 4 * 4 * 2 + 2


def find_nvcc() -> str | None:
    in_cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(in_cuda_home) if in_cuda_home.exists() else None)


def kernel_resources(ptxas_log: str) -> dict[str, dict[str, int]]:
    """Per compiled kernel (mangled name): registers, stack bytes, spill store and load bytes."""
    kernels, current = {}, None
    for line in ptxas_log.splitlines():
        if match := re.search(r"Compiling entry function '(\S+)'", line):
            current = kernels.setdefault(match.group(1), {})
        elif current is not None and (match := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        elif current is not None and (match := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(match.group(1))
    return kernels


@pytest.mark.slow
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not installed")
def test_cuda_kernel_compiles_for_sm90_without_spills(tmp_path):
    command = [find_nvcc(), "-std=c++17", f"-arch={ARCH}", "-O3", *TORCH_BUILD_DEFINES, "-Xptxas", "-v",
               "-c", str(CUDA_SOURCE), "-o", str(tmp_path / "gae_cuda.o")]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    kernels = kernel_resources(build.stderr)
    assert len(kernels) == EXPECTED_KERNELS, f"expected {EXPECTED_KERNELS} kernels, ptxas reported {len(kernels)}"
    spilling = {name: usage for name, usage in kernels.items()
                if usage["stack"] or usage["spill_stores"] or usage["spill_loads"]}
    assert not spilling, f"kernels using local memory on {ARCH}: {spilling}"


def test_resource_parser_sees_spills():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 19104 bytes smem"""
    assert kernel_resources(log) == {"_Z1kv": {"stack": 8, "spill_stores": 4, "spill_loads": 4, "registers": 64}}


# --- the kernel run on the host ----------------------------------------------------------------------------

def build_emulator(directory: Path, *flags: str) -> Path:
    compiler = shutil.which("g++")
    if compiler is None or not (CUDA_INCLUDE / "cuda_fp16.h").exists():
        pytest.skip("needs g++ and the CUDA headers to build the host emulation of the kernel")
    executable = directory / "gae_cuda_emulation"
    command = [compiler, "-std=c++20", "-pthread", "-Wno-attributes", *flags, f"-I{CUDA_INCLUDE}", f"-I{CSRC}",
               f"-I{EMULATION}", str(EMULATION / "gae_cuda_emulation.cpp"), "-o", str(executable)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "-fsanitize=thread" in flags and "tsan" in build.stderr:
        pytest.skip(f"ThreadSanitizer's runtime is not installed: {build.stderr[-300:]}")
    assert build.returncode == 0, f"building the emulation failed:\n{build.stderr[-4000:]}"
    return executable


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    return build_emulator(tmp_path_factory.mktemp("emulation"), "-O2")


@pytest.fixture(scope="module")
def race_checked_emulator(tmp_path_factory) -> Path:
    """The emulation under ThreadSanitizer: a barrier missing between shared-memory writes and reads of
    different threads is reported (checked by deleting one), and the run fails."""
    return build_emulator(tmp_path_factory.mktemp("emulation_tsan"), "-O1", "-fsanitize=thread", "-Wno-tsan")


def emulate(executable, rewards, values, mask, *, gamma, lam, whiten, sm_count):
    """(advantages, returns) of the CUDA kernel run on the host, planned for a GPU of `sm_count` SMs."""
    rows, cols = rewards.shape
    payload = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                       for t in (rewards, values, *([] if mask is None else [mask.to(torch.uint8)])))
    arguments = [rows, cols, repr(gamma), repr(lam), int(whiten), int(mask is not None), sm_count,
                 str(rewards.dtype).removeprefix("torch.")]
    run = subprocess.run([str(executable), *map(str, arguments)], input=payload, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-4000:]
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    advantages, returns = torch.frombuffer(bytearray(run.stdout), dtype=out_dtype).reshape(2, rows, cols)
    return advantages, returns


def check_emulated(executable, rows, cols, layout, *, whiten, sm_count, dtype=torch.float32):
    rewards, values = make_inputs(rows, cols, dtype=dtype)
    mask = make_mask(layout, rows, cols)
    got = emulate(executable, rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten, sm_count=sm_count)
    want = oracle(rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten)
    tol = tolerance(dtype, cols)
    scales = (0.0, gae_returns_scale(want[1], values, mask, dtype, tol))
    for name, g, w, scale in zip(("advantages", "returns"), got, want, scales, strict=True):
        assert_close_rel(g, w, tol, f"emulated CUDA kernel, {name}", scale=scale)
        if mask is not None:
            assert (g[~mask] == 0).all(), f"{name}: nonzero at a masked position"


# On a 1-SM plan the launcher wants 32 warps: these shapes give 1, 2, 4 and 8 warps a row (a block per row),
# several tiles a row, and several blocks (whitening merges their partials).
ROW_GROUP_SHAPES = {1: (40, 300), 2: (12, 700), 4: (6, 1500), 8: (2, 5000)}


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("layout", ["holes", "left_padding"])
@pytest.mark.parametrize("row_warps", sorted(ROW_GROUP_SHAPES))
def test_emulated_kernel_matches_oracle(emulator, row_warps, layout, whiten):
    rows, cols = ROW_GROUP_SHAPES[row_warps]
    check_emulated(emulator, rows, cols, layout, whiten=whiten, sm_count=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_emulated_kernel_input_dtypes(emulator, dtype):
    check_emulated(emulator, 9, 600, "holes", whiten=True, sm_count=1, dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 1), (9, 37)])
@pytest.mark.parametrize("layout", ["no_mask", "empty_rows"])
def test_emulated_kernel_small_batches(emulator, shape, layout):
    check_emulated(emulator, *shape, layout, whiten=True, sm_count=132)


@pytest.mark.slow
@pytest.mark.parametrize("row_warps", sorted(ROW_GROUP_SHAPES))
def test_emulated_kernel_has_no_shared_memory_races(race_checked_emulator, row_warps):
    rows, cols = ROW_GROUP_SHAPES[row_warps]
    check_emulated(race_checked_emulator, rows, cols, "holes", whiten=True, sm_count=1)

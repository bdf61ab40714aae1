"""The just-in-time build of `apa_fast._C` (apa_fast/_ext_build.py) and `python -m apa_fast.build`.

Each scenario runs in fresh processes with the installed `apa_fast._C` hidden (``sys.modules["apa_fast._C"] =
None`` makes its import fail as it does after a build-isolated `pip install .`) and APA_FAST_CACHE_DIR in a
temporary directory, so neither the prebuilt module nor the user's cache is touched. There is one real build
per session (about 30 s on 2 cores): two processes started together on an empty cache, which every test that
needs a finished build then reuses. The broken-compiler case fails within a second (CXX=false).
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from apa_fast import _dispatch, _ext_build

HIDE_INSTALLED = "import sys; sys.modules['apa_fast._C'] = None\n"
BUILD_LINE = "apa_fast: building apa_fast._C"

# gae on the C++ kernel against the PyTorch path; prints where the extension came from and the difference.
GAE_SCRIPT = HIDE_INSTALLED + """
import torch, apa_fast
from apa_fast import _dispatch
rewards, values = torch.randn(8, 300), torch.rand(8, 300)
mask = torch.rand(8, 300) < 0.7
got = apa_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="cpu")
want = apa_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="torch")
status = _dispatch.extension_status()
print(status.origin, status.path)
print(max((g - w).abs().max().item() for g, w in zip(got, want)))
# The op built from the shipped sources: its fake kernel is registered, it sits outside autograd.
torch.library.opcheck(torch.ops.apa_fast.gae.default, (rewards, values, mask, 0.99, 0.95, True))
print(any(out.requires_grad for out in torch.ops.apa_fast.gae(rewards.requires_grad_(), values, None, 1.0, 1.0, False)))
"""

FALLBACK_SCRIPT = HIDE_INSTALLED + """
import torch, apa_fast
from apa_fast import _dispatch
rewards, values = torch.randn(3, 40), torch.rand(3, 40)
got = apa_fast.gae(rewards, values)
want = apa_fast.gae(rewards, values, backend="torch")
print(_dispatch.pick_gae_backend("auto", torch.device("cpu")), all(torch.equal(g, w) for g, w in zip(got, want)))
try:
    apa_fast.gae(rewards, values, backend="cpu")
except RuntimeError as exc:
    print(exc)
"""

INFO_SCRIPT = HIDE_INSTALLED + "from apa_fast.info import main; main([])"
BUILD_SCRIPT = HIDE_INSTALLED + "from apa_fast.build import main; raise SystemExit(main(sys.argv[1:]))"


def _environment(cache, **extra):
    return {**os.environ, "APA_FAST_CACHE_DIR": str(cache), "APA_FAST_NO_EXT": "0", **extra}


def start(script, cache, *args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_environment(cache, **env))


def run(script, cache, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env=_environment(cache, **env))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache directory, [(stdout, stderr)] of two processes that started together on it while it was empty)."""
    cache = tmp_path_factory.mktemp("jit_cache")
    processes = [start(GAE_SCRIPT, cache) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    return cache, outputs


@pytest.mark.slow
def test_two_processes_build_once_and_match_the_torch_path(built):
    cache, outputs = built
    assert sum(BUILD_LINE in err for _, err in outputs) == 1, outputs
    builds = [path for path in cache.iterdir() if path.is_dir()]
    assert len(builds) == 1 and (builds[0] / _ext_build.KEY_FILE).exists()
    for out, _ in outputs:
        where, difference, requires_grad = out.splitlines()
        assert where.startswith(f"cached build {builds[0]}")
        assert float(difference) < 1e-5  # float32 rounding of whitened advantages on two algorithms
        assert requires_grad == "False"


@pytest.mark.slow
def test_later_process_loads_the_cache_without_building(built):
    cache, _ = built
    start_time = time.perf_counter()
    result = run(GAE_SCRIPT, cache)
    assert result.returncode == 0, result.stderr
    assert BUILD_LINE not in result.stderr and result.stdout.startswith("cached build ")
    assert time.perf_counter() - start_time < 20  # an import, not a compile (~30 s)


@pytest.mark.slow
def test_info_and_build_command_see_the_cached_build(built):
    cache, _ = built
    report = run(INFO_SCRIPT, cache)
    assert report.returncode == 0, report.stderr
    assert "extension     cached build: " in report.stdout and "gae backend   auto -> cpu on cpu" in report.stdout
    command = run(BUILD_SCRIPT, cache)
    assert command.returncode == 0 and "already built" in command.stdout, command.stdout + command.stderr
    assert BUILD_LINE not in command.stderr


def test_broken_compiler_falls_back_and_keeps_the_message(tmp_path):
    first = run(FALLBACK_SCRIPT, tmp_path, CXX="false")
    assert first.returncode == 0, first.stderr
    assert BUILD_LINE in first.stderr
    picked, *error = first.stdout.splitlines()
    assert picked == "torch True"
    assert "backend='cpu' cannot run" in error[0] and "'false'" in "\n".join(error)
    # Later processes fall back at once instead of failing the same build again; info shows the compiler.
    again = run(FALLBACK_SCRIPT, tmp_path, CXX="false")
    assert BUILD_LINE not in again.stderr and again.stdout.startswith("torch True")
    report = run(INFO_SCRIPT, tmp_path, CXX="false")
    assert "extension     failed build: " in report.stdout and "'false'" in report.stdout, report.stdout
    # The build command retries, and says why it failed.
    command = run(BUILD_SCRIPT, tmp_path, CXX="false")
    assert command.returncode == 1 and BUILD_LINE in command.stderr and "'false'" in command.stderr


def test_no_ext_disables_every_compiled_path(tmp_path):
    result = run(FALLBACK_SCRIPT, tmp_path, APA_FAST_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["torch True", "backend='cpu' cannot run: the compiled extension is "
                                          "disabled by APA_FAST_NO_EXT=1"]
    assert "extension     disabled" in run(INFO_SCRIPT, tmp_path, APA_FAST_NO_EXT="1").stdout
    assert run(BUILD_SCRIPT, tmp_path, APA_FAST_NO_EXT="1").returncode == 2
    assert not any(tmp_path.iterdir()), "nothing may be built or cached"


def test_info_does_not_build(tmp_path):
    report = run(INFO_SCRIPT, tmp_path)
    assert "extension     not built: " in report.stdout and "gae backend   auto -> torch on cpu" in report.stdout
    assert not any(tmp_path.iterdir())


# --- the cache key ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("torch_version", "2.99.0+cpu"), ("cxx11_abi", False), ("python", ".cpython-312-x86_64-linux-gnu.so"),
    ("cuda", "13.0"), ("cuda_archs", "9.0"), ("source_digest", "0" * 64)])
def test_every_incompatibility_gets_its_own_cache_directory(field, value):
    plan = _ext_build.plan()
    assert dataclasses.replace(plan, **{field: value}).directory != plan.directory
    assert dataclasses.replace(plan).directory == plan.directory


def test_source_digest_follows_every_shipped_source(tmp_path):
    sources = tmp_path / "csrc"
    shutil.copytree(_ext_build.source_dir(), sources)
    before = _ext_build.source_digest(sources)
    assert before == _ext_build.plan().source_digest
    header = sources / "gae_math.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert _ext_build.source_digest(sources) != before


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("APA_FAST_CACHE_DIR", str(tmp_path))
    assert _ext_build.plan().directory.parent == tmp_path
    monkeypatch.delenv("APA_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _ext_build.plan().directory.parent == tmp_path / "xdg" / "apa_fast"


def test_an_interrupted_build_counts_as_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("APA_FAST_CACHE_DIR", str(tmp_path))
    plan = _ext_build.plan()
    plan.directory.mkdir(parents=True)
    (plan.directory / "lock").write_text("")  # torch's build lock, left by a killed process
    assert _ext_build.state(plan) == "absent"
    (plan.directory / _ext_build.ERROR_FILE).write_text("boom")
    assert _ext_build.state(plan) == "failed"
    (plan.directory / _ext_build.KEY_FILE).write_text("{}")
    assert _ext_build.state(plan) == "built"


def test_cuda_tensors_never_start_a_build_without_the_cuda_kernel(monkeypatch):
    cpu_only = dataclasses.replace(_ext_build.plan(), cuda=None, cuda_archs=None,
                                   no_cuda_reason="torch 2.13.0+cpu is a CPU build")
    monkeypatch.setattr(_ext_build, "plan", lambda: cpu_only)
    monkeypatch.setattr(_dispatch, "_status", _dispatch.ExtensionStatus(None, "not built", "/cache/x"))
    monkeypatch.setattr(_dispatch, "_find_extension", lambda build: pytest.fail("a build was started"))
    cuda = torch.device("cuda")
    assert _dispatch.pick_gae_backend("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match="CUDA kernel cannot be built here: torch 2.13.0.cpu is a CPU build"):
        _dispatch.pick_gae_backend("cuda", cuda)

"""The just-in-time build of `apa_fast._C` (apa_fast/_ext_build.py) and `python -m apa_fast.build`.

Each scenario runs in fresh processes with the installed `apa_fast._C` hidden (``sys.modules["apa_fast._C"] =
None`` makes its import fail as it does after a build-isolated `pip install .`) and APA_FAST_CACHE_DIR in a
temporary directory, so neither the prebuilt module nor the user's cache is touched. There is one real build
per session (about 30 s on 2 cores): two processes started together on an empty cache, which every test that
needs a finished build then reuses. The broken-compiler case fails within a second (CXX=false).

Caches that cannot be used (issue 19) are tested in this process, with the installed module hidden the same
way and the dispatcher's once-a-process state reset; corrupt cached builds, which could kill the process inside
dlopen, in subprocesses, on a copy of the installed module with a manifest (no compile: CXX=false makes every
rebuild they start fail at once).
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import apa_fast
from apa_fast import _dispatch, _ext_build, build, info

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
    assert len(builds) == 1
    # The manifest describes the module that was built, and the key of this plan.
    manifest = json.loads((builds[0] / _ext_build.MANIFEST_FILE).read_text())
    module = builds[0] / _ext_build.module_path(_ext_build.plan()).name
    assert manifest["module_size"] == module.stat().st_size > 0
    assert manifest["module_sha256"] == _ext_build._sha256(module)
    assert manifest["key"] == json.loads(json.dumps(_ext_build.plan().key))
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
    assert _ext_build.examine(plan) == ("failed", "boom")
    _ext_build.module_path(plan).write_bytes(os.urandom(1000))
    _ext_build._write_manifest(plan)
    assert _ext_build.examine(plan) == ("built", "")


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


# --- caches that cannot be used (issue 19): the PyTorch path, one line, and clear errors ------------------------

@pytest.fixture
def no_extension_yet(monkeypatch):
    """This process as one with no installed apa_fast._C that has not looked for the extension yet; a rebuild
    that a test starts by mistake fails at once (CXX=false) instead of compiling."""
    monkeypatch.setitem(sys.modules, "apa_fast._C", None)
    monkeypatch.setattr(_dispatch, "_status", None)
    monkeypatch.setattr(_dispatch, "_fallback_reported", False)
    monkeypatch.setenv("APA_FAST_NO_EXT", "0")
    monkeypatch.setenv("CXX", "false")


def _unusable_cache(variant: str, tmp_path: Path) -> Path:
    """A cache path that cannot hold a build, as a cluster node or a typo gives one."""
    if variant == "sysfs":  # a read-only HOME or XDG_CACHE_HOME fails the same way
        return Path("/sys/apa_fast_cache")
    (tmp_path / "file").write_text("")
    if variant == "a file":
        return tmp_path / "file"
    if variant == "under a file":
        return tmp_path / "file" / "cache"
    if variant == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
        return tmp_path / "ro" / "cache"
    cache = tmp_path / "cache"
    directory = cache / _ext_build.plan().directory.name
    cache.mkdir()
    if variant == "build directory is a file":
        directory.write_text("")
    else:  # "lock is a directory": the lock file cannot be opened
        Path(f"{directory}.lock").mkdir()
    return cache


# Each is seen without building (info, the first look of a gae call) but the last two, which only a build meets.
SEEN_BY_INFO = ["sysfs", "a file", "under a file", "read-only"]
CACHE_VARIANTS = [*SEEN_BY_INFO, "build directory is a file", "lock is a directory"]


@pytest.mark.parametrize("variant", CACHE_VARIANTS)
def test_unusable_cache_falls_back_with_one_line(variant, tmp_path, monkeypatch, capsys, no_extension_yet):
    if variant == "sysfs" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    if variant == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    monkeypatch.setenv("APA_FAST_CACHE_DIR", str(_unusable_cache(variant, tmp_path)))
    rewards, values = torch.randn(3, 29, dtype=torch.float64), torch.randn(3, 29, dtype=torch.float64)
    mask = torch.rand(3, 29) < 0.8
    got = apa_fast.gae(rewards, values, mask, gamma=0.9, lam=0.7)
    want = apa_fast.gae(rewards, values, mask, gamma=0.9, lam=0.7, backend="torch")
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    line, *more = capsys.readouterr().err.splitlines()
    assert not more and line.startswith("apa_fast: gae(backend='auto') runs on PyTorch: ") and "cannot be used" in line
    apa_fast.gae(rewards, values)
    assert capsys.readouterr().err == "", "one line a process"
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run: .*the build cache .* cannot be used \(\w+Error"):
        apa_fast.gae(rewards, values, backend="cpu")
    if variant in SEEN_BY_INFO:  # a fresh `python -m apa_fast.info`
        monkeypatch.setattr(_dispatch, "_status", None)
        report = info.environment_report()
        assert "extension     cache unusable: " in report and "gae backend   auto -> torch on cpu" in report
        assert capsys.readouterr().err == ""
    assert build.main([]) == 1
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "cannot be used" in err and "Traceback" not in out + err


def test_cache_problem_names_a_root_that_is_not_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("APA_FAST_CACHE_DIR", str(tmp_path))
    assert _ext_build.cache_problem(_ext_build.plan()) is None
    monkeypatch.setattr(_ext_build.os, "access", lambda path, mode: False)  # as a read-only directory reads
    problem = _ext_build.cache_problem(_ext_build.plan())
    assert f"the build cache {_ext_build.plan().directory} cannot be used (PermissionError" in problem
    assert "not writable" in problem


# --- corrupt cached builds: refused before dlopen by the manifest's size and sha256 ----------------------------

def _installed_module() -> Path:
    spec = importlib.util.find_spec("apa_fast._C")
    if spec is None:
        pytest.skip("no installed apa_fast._C to copy")
    return Path(spec.origin)


def _fabricated_build(cache: Path, corruption: str | None = None) -> Path:
    """A finished build of this plan in ``cache`` without compiling: a copy of the installed module, with the
    manifest of that copy; then ``corruption`` applied to the module. Returns the build directory."""
    plan = _ext_build.plan()
    directory = cache / plan.directory.name
    directory.mkdir(parents=True)
    module = directory / _ext_build.module_path(plan).name
    shutil.copyfile(_installed_module(), module)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APA_FAST_CACHE_DIR", str(cache))
        _ext_build._write_manifest(plan)
    size = module.stat().st_size
    if corruption == "truncated":  # a torn copy: what made dlopen die with SIGBUS
        os.truncate(module, 4096)
    elif corruption == "zeroed":
        module.write_bytes(bytes(size))
    elif corruption == "random bytes":
        module.write_bytes(os.urandom(size))
    return directory


# For each pair of caches: info, then gae, on the first; the build command on the second; stderr kept per step.
# One process for every corruption: each subprocess costs seconds, a step on a corrupt cache milliseconds.
CORRUPT_SCRIPT = HIDE_INSTALLED + """
import contextlib, io, json, os, torch, apa_fast
from apa_fast import _dispatch, build, info

def step(cache, call):
    os.environ["APA_FAST_CACHE_DIR"] = cache
    _dispatch._status, _dispatch._fallback_reported = None, False  # as in a fresh process
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        result = call()
    return result, err.getvalue()

rewards, values = torch.randn(3, 37), torch.rand(3, 37)
for first, second in zip(sys.argv[1::2], sys.argv[2::2]):
    report, _ = step(first, info.environment_report)
    (got, _), gae_err = step(first, lambda: apa_fast.gae(rewards, values, gamma=0.99))
    same = torch.equal(got, apa_fast.gae(rewards, values, gamma=0.99, backend="torch")[0])
    code, build_err = step(second, lambda: build.main([]))
    print(json.dumps(dict(report=report, same=same, gae_err=gae_err, code=code, build_err=build_err)))
"""

STALE_REASONS = {"truncated": "is 4096 bytes where its manifest records", "zeroed": "sha256",
                 "random bytes": "sha256"}


def test_corrupt_cached_build_is_never_loaded(tmp_path):
    caches = [tmp_path / f"{corruption}-{use}" for corruption in STALE_REASONS for use in ("gae", "build")]
    for cache in caches:
        _fabricated_build(cache, cache.name.rsplit("-", 1)[0])
    result = run(CORRUPT_SCRIPT, tmp_path, *map(str, caches), CXX="false")
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"  # -7 was SIGBUS
    for (corruption, reason), line in zip(STALE_REASONS.items(), result.stdout.splitlines(), strict=True):
        steps = json.loads(line)
        # info looks without loading or building, and says why the cached build is not used.
        assert "extension     not built: " in steps["report"] and "the cached build is stale (" in steps["report"]
        assert reason in steps["report"] and "gae backend   auto -> torch on cpu" in steps["report"], corruption
        # gae rebuilds it (under the lock); that rebuild failing too, it runs on PyTorch with one line.
        building, fallback = steps["gae_err"].splitlines()
        assert building.startswith(BUILD_LINE) and reason in building, corruption
        assert fallback.startswith("apa_fast: gae(backend='auto') runs on PyTorch: ") and steps["same"], corruption
        # The build command retries a corrupt build (issue 19, item 13), and says what was wrong with it.
        assert steps["code"] == 1 and BUILD_LINE in steps["build_err"] and reason in steps["build_err"], corruption
        assert "the build failed; compiler output:" in steps["build_err"], corruption


def test_manifests_that_do_not_describe_the_module_are_stale(tmp_path, monkeypatch):
    directory = _fabricated_build(tmp_path)
    monkeypatch.setenv("APA_FAST_CACHE_DIR", str(tmp_path))
    plan = _ext_build.plan()
    manifest_file = directory / _ext_build.MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    assert _ext_build.examine(plan) == ("built", "")
    for text, reason in [
            (json.dumps(manifest["key"]), "records no size and sha256"),  # an older apa_fast's bare key
            (manifest_file.read_text()[:40], "records no size and sha256"),  # a torn manifest
            (json.dumps({**manifest, "key": {**manifest["key"], "torch_version": "0.0"}}), "another configuration"),
            (json.dumps({**manifest, "module_sha256": "0" * 64}), "sha256")]:
        manifest_file.write_text(text)
        current, detail = _ext_build.examine(plan)
        assert current == "stale" and reason in detail, (text, detail)
    manifest_file.write_text(json.dumps(manifest))
    _ext_build.module_path(plan).unlink()
    assert _ext_build.examine(plan)[0] == "stale" and "is missing" in _ext_build.examine(plan)[1]


def test_stale_and_failed_builds_are_rebuilt_only_when_building(tmp_path, monkeypatch):
    _fabricated_build(tmp_path, "truncated")
    monkeypatch.setenv("APA_FAST_CACHE_DIR", str(tmp_path))
    plan = _ext_build.plan()
    monkeypatch.setattr(_ext_build, "_import", lambda plan: pytest.fail("a stale build was loaded"))
    compiled = []
    monkeypatch.setattr(_ext_build, "_compile", lambda plan, why="": compiled.append(why))
    assert _ext_build.load(plan, build=False) is None and not compiled
    _ext_build.load(plan)
    _ext_build.build(plan)
    assert len(compiled) == 2 and all("is 4096 bytes" in why for why in compiled)
    shutil.rmtree(plan.directory)
    plan.directory.mkdir()
    (plan.directory / _ext_build.ERROR_FILE).write_text("error: boom")
    with pytest.raises(_ext_build.BuildFailed, match="boom"):
        _ext_build.load(plan)  # later processes do not retry a failed build
    assert _ext_build.build(plan) and compiled[-1] == "retrying a failed build"

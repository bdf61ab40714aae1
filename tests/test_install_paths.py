"""The install paths users take, each in a fresh virtual environment (issue 14): then `apa_fast.gae` on CPU.

(a) `pip install <checkout>` and (b) a wheel from `pip wheel --no-deps <checkout>` (both with pip's build
isolation, so no `apa_fast._C` is installed) build the extension just in time on the first call; (c)
`pip install --no-build-isolation -e <checkout>` builds it at install time. After each, `gae(backend="cpu")`
matches the PyTorch path, and later processes load the cache without building.

Cost (about 2-3 minutes on 2 cores): one venv gets pip's own torch install (the pinned CPU wheel from local
disk, ~20 s), and each path runs in a copy of it (a venv copied whole, run through its own `bin/python`, is a
working venv; the copy is made of hard links, under a second). There are two compiles: the just-in-time one,
which path (a) does with two processes started together on the empty cache (one builds, the other waits on
the lock and loads it), and path (c)'s install-time one. Path (b) loads path (a)'s cached build: the cache
key is the same whichever path installed the package (same torch, Python and sources), which the test
asserts. Each path installs from its own copy of the tracked files, so the repository's build outputs
(apa_fast/_C*.so, build/) do not leak in; APA_FAST_CACHE_DIR is a temporary directory.

`pytest -s -m slow tests/test_install_paths.py` prints the timings of the three paths.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_LINE = "apa_fast: building apa_fast._C"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")

# gae on the compiled CPU kernel against the PyTorch path; one JSON line: where things came from, timings.
GAE_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch, apa_fast
from apa_fast import _dispatch, _ext_build
imported = time.perf_counter()
rewards, values = torch.randn(8, 300), torch.rand(8, 300)
mask = torch.rand(8, 300) < 0.7
got = apa_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="cpu")
called = time.perf_counter()
want = apa_fast.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend="torch")
status = _dispatch.extension_status()
print(json.dumps({
    "origin": status.origin, "path": status.path, "package": apa_fast.__file__,
    "cache_key_dir": str(_ext_build.plan().directory), "sources": str(_ext_build.plan().sources),
    "difference": max((g - w).abs().max().item() for g, w in zip(got, want, strict=True)),
    "import_s": imported - start, "first_call_s": called - imported,
}))
"""
# The same with the installed apa_fast._C hidden: what a just-in-time build would use here.
HIDDEN_SCRIPT = "import sys; sys.modules['apa_fast._C'] = None\n" + GAE_SCRIPT

TIMINGS: dict[str, dict[str, float]] = {}


def _environment(cache: Path) -> dict[str, str]:
    """The caller's environment as a user's shell would have it: no venv or test settings leaking in."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "APA_FAST_NO_EXT", "TRITON_INTERPRET")}
    environment.update(APA_FAST_CACHE_DIR=str(cache), PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                       PIP_NO_INPUT="1")
    return environment


class Workspace:
    """A temporary directory holding the base venv, the venv copies, the source copies and the shared cache."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.env = _environment(self.cache)

    def run(self, *command, timeout=600) -> tuple[subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout,
                                env=self.env, cwd=self.root)
        elapsed = time.perf_counter() - start
        assert result.returncode == 0, f"{command}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        return result, elapsed

    def venv(self, name: str) -> Path:
        """A fresh venv holding what the base one holds (pip, setuptools and torch), as `name`.

        Its files are hard links to the base venv's (under a second, against ~8 s for copies on a loaded
        machine): pip and Python only ever add files or replace them whole, never write into one in place.
        """
        target = self.root / name
        shutil.copytree(self.root / "base", target, symlinks=True, copy_function=os.link)
        return target

    def sources(self, name: str) -> Path:
        """A copy of the checkout's tracked files (their working-tree content): no build outputs."""
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        target = self.root / name
        for relative in filter(None, listed.decode().split("\0")):
            if (REPO / relative).is_file():
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / relative, target / relative)
        return target

    def gae(self, venv: Path, script: str = GAE_SCRIPT) -> tuple[dict, str, float]:
        """(report, stderr, wall seconds) of one process running ``script`` in ``venv``."""
        result, elapsed = self.run(python(venv), "-c", script)
        return json.loads(result.stdout.splitlines()[-1]), result.stderr, elapsed

    def start_gae(self, venv: Path) -> subprocess.Popen:
        return subprocess.Popen([str(python(venv)), "-c", GAE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env, cwd=self.root)


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def check_report(report: dict, venv_or_source: Path, origin: str) -> None:
    assert report["origin"] == origin, report
    assert Path(report["package"]).is_relative_to(venv_or_source), report  # not the repository's package
    assert report["difference"] < 1e-5, report  # float32 rounding of whitened advantages, two algorithms


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the installs copy its tracked files)")
    workspace = Workspace(tmp_path_factory.mktemp("install_paths"))
    base = workspace.root / "base"
    subprocess.run([sys.executable, "-m", "venv", str(base)], check=True, timeout=120)
    # The torch this suite runs, first and alone (anything else pulling torch unpinned fetches a CUDA build).
    workspace.run(python(base), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}")
    yield workspace
    if TIMINGS:
        print("\ninstall path    install   first call (its process)   later process: first call (process)")
        for name, t in TIMINGS.items():
            print((f"{name:13} {t['install']:7.1f} s {t['first_call']:10.2f} s ({t['first_process']:5.1f} s)"
                  f" {t['later_call']:24.2f} s ({t['later_process']:4.1f} s)  {t.get('detail', '')}").rstrip())
    shutil.rmtree(workspace.root, ignore_errors=True)


@pytest.fixture(scope="module")
def plain_install(workspace):
    """(a) `pip install <checkout>`, then two processes started together on the empty cache, then a third."""
    venv, source = workspace.venv("venv_plain"), workspace.sources("src_plain")
    _, install_s = workspace.run(python(venv), "-m", "pip", "install", "-q", source)
    start = time.perf_counter()
    processes = [workspace.start_gae(venv) for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    first_process_s = time.perf_counter() - start
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    together = [(json.loads(out.splitlines()[-1]), err) for out, err in outputs]
    later = workspace.gae(venv)
    TIMINGS["(a) plain"] = {
        "install": install_s, "first_call": max(report["first_call_s"] for report, _ in together),
        "first_process": first_process_s, "later_call": later[0]["first_call_s"], "later_process": later[2]}
    return venv, together, later


def test_plain_install_ships_sources_and_no_extension(workspace, plain_install):
    venv, _, _ = plain_install
    package = site_packages(venv) / "apa_fast"
    assert not list(package.glob("_C*")), "build isolation hides torch: no apa_fast._C is built at install time"
    shipped = sorted(path.name for path in (package / "csrc").iterdir() if path.suffix in SOURCE_SUFFIXES)
    assert shipped == sorted(path.name for path in (REPO / "csrc").iterdir() if path.suffix in SOURCE_SUFFIXES)


def test_plain_install_two_processes_build_once_and_match_the_torch_path(workspace, plain_install):
    venv, together, _ = plain_install
    assert sum(BUILD_LINE in err for _, err in together) == 1, together
    builds = [path for path in workspace.cache.iterdir() if path.is_dir()]
    assert len(builds) == 1, builds
    for report, _ in together:
        check_report(report, venv, "cached build")
        assert Path(report["path"]).parent == builds[0]
        assert Path(report["sources"]).is_relative_to(site_packages(venv))  # the shipped package data


def test_plain_install_later_process_loads_the_cache(workspace, plain_install):
    venv, together, (report, stderr, _) = plain_install
    assert BUILD_LINE not in stderr, stderr
    check_report(report, venv, "cached build")
    assert report["path"] == together[0][0]["path"]
    assert report["first_call_s"] < 15, report  # an import, not a compile (~25 s)


@pytest.fixture(scope="module")
def wheel_install(workspace, plain_install):
    """(b) `pip wheel --no-deps <checkout>`, installed into another fresh venv; run after (a) built the cache."""
    venv, source = workspace.venv("venv_wheel"), workspace.sources("src_wheel")
    wheelhouse = workspace.root / "wheelhouse"
    _, wheel_s = workspace.run(python(venv), "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheelhouse, source)
    (wheel,) = wheelhouse.glob("apa_fast-*.whl")
    _, install_s = workspace.run(python(venv), "-m", "pip", "install", "-q", wheel)
    first = workspace.gae(venv)
    later = workspace.gae(venv)
    TIMINGS["(b) wheel"] = {
        "install": wheel_s + install_s, "detail": f"pip wheel {wheel_s:.1f} s + pip install {install_s:.1f} s",
        "first_call": first[0]["first_call_s"], "first_process": first[2],
        "later_call": later[0]["first_call_s"], "later_process": later[2]}
    return venv, wheel, first, later


def test_wheel_is_pure_and_ships_the_sources(wheel_install):
    _, wheel, _, _ = wheel_install
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # no extension: not tied to a torch or Python
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.endswith(".so")], names
    for path in (REPO / "csrc").iterdir():
        if path.suffix in SOURCE_SUFFIXES:
            assert f"apa_fast/csrc/{path.name}" in names


def test_wheel_install_loads_the_build_of_the_plain_install(workspace, plain_install, wheel_install):
    """Same torch, Python and sources: the same cache key, so the wheel's first call builds nothing."""
    _, together, _ = plain_install
    venv, _, first, later = wheel_install
    for report, stderr, _ in (first, later):
        assert BUILD_LINE not in stderr, stderr
        check_report(report, venv, "cached build")
        assert report["path"] == together[0][0]["path"]
        assert report["cache_key_dir"] == together[0][0]["cache_key_dir"]
    assert len([path for path in workspace.cache.iterdir() if path.is_dir()]) == 1


@pytest.fixture(scope="module")
def editable_install(workspace, plain_install):
    """(c) `pip install --no-build-isolation -e <checkout>`: setup.py sees torch and builds apa_fast._C."""
    venv, source = workspace.venv("venv_editable"), workspace.sources("src_editable")
    _, install_s = workspace.run(python(venv), "-m", "pip", "install", "-q", "--no-build-isolation", "-e", source)
    first = workspace.gae(venv)
    later = workspace.gae(venv)
    hidden = workspace.gae(venv, HIDDEN_SCRIPT)
    TIMINGS["(c) editable"] = {
        "install": install_s, "first_call": first[0]["first_call_s"], "first_process": first[2],
        "later_call": later[0]["first_call_s"], "later_process": later[2]}
    return venv, source, first, later, hidden


def test_editable_install_uses_its_installed_extension(workspace, editable_install):
    _, source, first, later, _ = editable_install
    for report, stderr, _ in (first, later):
        assert BUILD_LINE not in stderr, stderr
        check_report(report, source, "installed")
        assert Path(report["path"]).parent == source / "apa_fast"  # built in place by the editable install
    assert len([path for path in workspace.cache.iterdir() if path.is_dir()]) == 1  # nothing built just in time


def test_editable_checkout_has_the_same_cache_key(workspace, plain_install, editable_install):
    """Its sources are the checkout's csrc/, not package data, and hash the same: the cached build loads."""
    _, together, _ = plain_install
    _, source, _, _, (report, stderr, _) = editable_install
    assert BUILD_LINE not in stderr, stderr
    check_report(report, source, "cached build")
    assert Path(report["sources"]) == source / "csrc"
    assert report["path"] == together[0][0]["path"]

"""`python -m apa_fast.info`: the environment report (the `--aot` report is tested in test_aot.py, the
extension's origins end to end, in fresh processes, in test_build.py)."""

import pytest

from apa_fast import _dispatch, info

ORIGINS = ("installed", "cached build", "failed build", "cache unusable", "disabled", "not built")


def test_environment_report_names_versions_extension_and_backends():
    report = info.environment_report()
    for key in ("torch", "triton", "device", "loss backend  auto -> torch on cpu", "gae backend   auto -> "):
        assert key in report
    extension = next(line for line in report.splitlines() if line.startswith("extension"))
    assert extension.removeprefix("extension").strip().startswith(ORIGINS), extension


def test_installed_extension_is_preferred_and_reported_with_its_file():
    status = _dispatch.extension_status(build=False)
    if status.origin != "installed":
        pytest.skip(f"no prebuilt apa_fast._C here ({status.origin}); test_build.py covers the other origins")
    assert status.path.endswith(".so") and "apa_fast" in status.path
    assert f"extension     installed: {status.path}" in info.environment_report()


def test_failed_build_shows_the_compiler_output(monkeypatch):
    output = "\n".join(f"line {i}" for i in range(100)) + "\ncsrc/gae_binding.cpp:1: error: simulated"
    monkeypatch.setattr(_dispatch, "_status", _dispatch.ExtensionStatus(None, "failed build", "/cache/ab12", output))
    lines = info.environment_report().splitlines()
    head = lines.index(next(line for line in lines if line.startswith("extension")))
    assert lines[head].startswith("extension     failed build: /cache/ab12") and "apa_fast.build" in lines[head]
    assert lines[head + 30] == "    csrc/gae_binding.cpp:1: error: simulated"  # the last 30 lines of the output
    assert "gae backend   auto -> torch on cpu" in lines

"""`python -m apa_fast.info`: the environment report, and every Triton kernel compiled for sm_90 without spills."""

import os
import re
import subprocess
import sys

import pytest

from apa_fast import info


def _run_info(*args, interpret="0"):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    return subprocess.run([sys.executable, "-m", "apa_fast.info", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_environment_report_names_versions_extension_and_backends():
    report = info.environment_report()
    for key in ("torch", "triton", "device", "extension", "loss backend  auto -> torch on cpu"):
        assert key in report


def _nvidia_backend_available():
    try:
        return os.path.exists(info._cuobjdump())
    except Exception:
        return False


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend (cuobjdump) is not installed")
def test_every_kernel_compiles_for_sm90_without_spills():
    result = _run_info("--aot", "sm_90")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| logprob_")]
    # 3 block sizes x 3 dtypes x (4 forward epilogues + 1 backward)
    assert len(rows) == 45, result.stdout
    for row in rows:
        registers, shared, stack, local, status = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert status == "ok" and stack == "0" and local == "0", row
        assert 0 < int(registers) <= 255, row


def test_aot_refuses_to_run_under_the_interpreter():
    result = _run_info("--aot", "sm_90", interpret="1")
    assert result.returncode == 2
    assert re.search("TRITON_INTERPRET=0", result.stderr)


def test_spills_are_reported_as_failures():
    row = info.KernelResources("k", registers=255, stack=112, local=0, shared=0)
    assert not row.ok
    assert "SPILLS" in info.format_aot([row], "sm_90")

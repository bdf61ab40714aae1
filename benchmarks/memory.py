"""Peak CPU memory (resident set) of a benchmark step above its inputs, measured in a fresh process.

Why a separate process: the pytest process holds other benchmarks' memory and glibc keeps freed heap, so
its resident set says little about one step. The child runs with ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB, so
every tensor-sized allocation is an ``mmap`` returned to the system when freed and one step's peak does not
hide in memory an earlier one left behind. The peak is read from ``VmHWM`` after resetting it through
``/proc/self/clear_refs`` (Linux only); each case gets one untimed warm-up call first.

Usage from a benchmark (``module`` exposes ``Case``, ``make_inputs`` and ``build_measurement``)::

    peaks = peak_rss_in_subprocess("benchmarks.logprob_providers", [case.fields() for case in cases])

and from a shell: ``python -m benchmarks.memory benchmarks.logprob_providers '[{"op": "apa_loss", ...}]'``.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

MIB = 2**20
REPO_ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def reset_peak_rss() -> None:
    """Make VmHWM equal to the current resident set (writing 5 to clear_refs, Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_peak_above_now_mib(step, setup=None) -> float:
    """Peak resident set of one ``setup`` + ``step`` above the resident set before it (MiB)."""
    gc.collect()
    reset_peak_rss()
    before = _status_kib("VmRSS")
    args = setup() if setup is not None else ()
    step(*args)
    del args
    return (_status_kib("VmHWM") - before) * 1024 / MIB


def measure_cases(module_name: str, case_fields: list[dict], device: str = "cpu") -> dict[str, float]:
    """Peak MiB above the inputs for each case (by ``Case.id``), in this process."""
    module = importlib.import_module(module_name)
    peaks = {}
    for fields in case_fields:
        case = module.Case(**fields)
        inputs = module.make_inputs(case, device)
        step, setup = module.build_measurement(case, inputs)
        step(*setup())  # warm-up: first-call allocations (compilation, thread pools) are not the step's
        peaks[case.id] = rss_peak_above_now_mib(step, setup)
        del inputs, step, setup
    return peaks


def peak_rss_in_subprocess(module_name: str, case_fields: list[dict], timeout_s: float = 600) -> dict[str, float]:
    """`measure_cases` in a fresh interpreter with tensor allocations served by mmap (see the module doc)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), MALLOC_TRIM_THRESHOLD_=str(64 * 1024))
    command = [sys.executable, "-m", "benchmarks.memory", module_name, json.dumps(case_fields)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    module_name, cases_json = argv
    print(json.dumps(measure_cases(module_name, json.loads(cases_json))))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Append benchmark measurements to ``benchmarks/results/<device>.jsonl`` (one JSON object per line).

Every figure ever measured stays re-plottable: `python -m benchmarks.report` turns the files into tables
and plots. Fields: op, provider, mode, tokens, vocab, dtype, ms, peak_mem_mb, gbps, floor_fraction,
device, torch, triton, commit, date (plus any op-specific extras).
"""

from __future__ import annotations

import datetime
import functools
import json
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@functools.cache
def device_name(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


@functools.cache
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS_DIR.parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def append_record(device: str = "cpu", **fields) -> dict:
    """Write one measurement; missing standard fields are filled (None where not measured)."""
    record = {key: None for key in ("op", "provider", "mode", "tokens", "vocab", "dtype", "ms",
                                    "peak_mem_mb", "gbps", "floor_fraction")}
    record.update(fields)
    name = device_name(device)
    record.update(device=name, torch=torch.__version__, triton=_triton_version(), commit=_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".jsonl")
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record

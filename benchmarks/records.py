"""Append benchmark measurements to ``benchmarks/results/<device>.jsonl`` (one JSON object per line).

Every figure ever measured stays re-plottable: `python -m benchmarks.report` turns the files into tables
and plots. A record has three kinds of fields:

* the case (what was measured): ``op``, ``mode``, ``tokens``, ``vocab``, ``dtype`` and any op-specific
  shape field a benchmark adds (``batch``, ``steps``, ``hidden``...); the report makes one table row per case;
* the provider (who computed it): ``provider`` (``apa_fast``, ``torch``, ``torch_compile``, ``liger``,
  ``flash_attn``), optionally ``variant`` (``inplace``) and ``backend`` (``triton``, ``torch``, ``cuda``...);
* the measurement and its context: ``ms`` (median), ``peak_mem_mb`` (MiB above the inputs), ``gbps`` and
  ``floor_fraction`` (bytes the memory floor counts over the time, and that rate over the measured copy
  bandwidth), ``bytes_by_design`` (the DRAM bytes the provider's design moves), ``device``, ``torch``,
  ``triton``, ``commit``, ``date``, plus the `METADATA_FIELDS` below.

``APA_BENCH_RESULTS_DIR`` redirects the files (the GPU script writes straight into the folder the device tool
copies back); ``APA_BENCH_COMMIT`` names the commit where the tree has no ``.git`` (the device machine).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
STANDARD_FIELDS = ("op", "provider", "mode", "tokens", "vocab", "dtype", "ms", "peak_mem_mb", "gbps",
                   "floor_fraction")
PROVIDER_FIELDS = ("provider", "variant", "backend")
# Fields that describe how a figure was obtained rather than what was measured: never part of a case key.
METADATA_FIELDS = ("ms", "peak_mem_mb", "gbps", "floor_fraction", "device", "torch", "triton", "commit", "date",
                   "copy_gbps", "floor_bytes", "bytes_by_design", "rounds", "memory_metric", "error", "compile",
                   "note")


def results_dir() -> Path:
    return Path(os.environ.get("APA_BENCH_RESULTS_DIR", DEFAULT_RESULTS_DIR))


@functools.cache
def device_name(device: str = "cpu") -> str:
    """A stable human-readable name: the GPU's product name, or the CPU architecture and thread count."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def results_path(device: str = "cpu") -> Path:
    """The JSONL file of ``device``'s records (its name made safe for a file name)."""
    return results_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name(device)) + ".jsonl")


@functools.cache
def _commit() -> str:
    if os.environ.get("APA_BENCH_COMMIT"):
        return os.environ["APA_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=DEFAULT_RESULTS_DIR.parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # a broken triton install raises more than ImportError
        return None
    return triton.__version__


def append_record(device: str = "cpu", **fields) -> dict:
    """Write one measurement and return it; missing standard fields are filled (None where not measured).

    ``device`` is the torch device the measurement ran on ("cpu", "cuda", "cuda:0"); the record's
    ``device`` field holds its product name. Extra keyword fields are kept as they are.
    """
    record = dict.fromkeys(STANDARD_FIELDS)
    record.update(fields)
    record.update(device=device_name(device), torch=torch.__version__, triton=_triton_version(), commit=_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    path = results_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def load_records(paths=None) -> list[dict]:
    """Every record of the given JSONL files (default: all of `results_dir()`), skipping unreadable lines."""
    if paths is None:
        paths = sorted(results_dir().glob("*.jsonl"))
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a run killed mid-write leaves at most one partial last line
    return records

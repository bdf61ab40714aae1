"""`apa_fast.aot` (``python -m apa_fast.info --aot ARCH [--json]``): the report's schema, its SASS reading, the
argument checks, and the headline variants' properties (bf16, V = 50,400: no spills, 128-bit global accesses,
no barrier inside a vocabulary loop). Compiles run in a subprocess without TRITON_INTERPRET (this suite's
conftest turns the interpreter on, and it is read when the kernels are defined)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apa_fast import aot

needs_toolchain = pytest.mark.skipif(aot.toolchain_error() is not None,
                                     reason=f"AOT toolchain absent: {aot.toolchain_error()}")


def _run(*args, interpret="0", code=None):
    env = {**os.environ, "TRITON_INTERPRET": interpret, "TRITON_DEFAULT_FP_FUSION": "1"}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "apa_fast.info", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


# Compiles the given variants of aot_variants() and prints their JSON objects (with the ok flag beside them).
_COMPILE = """
import json, sys, torch
from apa_fast import aot
from apa_fast.kernels import logprob
vocab, dtype, kinds = {vocab}, getattr(torch, "{dtype}"), {kinds}
variants = [v for v in logprob.aot_variants(vocabs=(vocab,), dtypes=(dtype,)) if v["kind"] in kinds]
print(json.dumps([dict(row.as_json(), ok=row.ok, error=row.error) for row in aot.report("sm_90", variants)]))
"""


def _compiled_rows(vocab, dtype, kinds):
    result = _run(code=_COMPILE.format(vocab=vocab, dtype=dtype, kinds=repr(kinds)))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_toolchain
def test_json_schema_of_one_small_variant():
    (row,) = _compiled_rows(1024, "float32", ("logprobs",))[:1]
    assert list(row)[:len(aot.JSON_KEYS)] == list(aot.JSON_KEYS)
    assert row["ok"], row["error"]
    assert row["kernel"] == "logprob_fwd_kernel[logprobs]" and row["pass"] == "forward"
    assert (row["dtype"], row["vocab"], row["block_v"], row["num_warps"]) == ("float32", 1024, 1024, 4)
    assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0 and row["shared_bytes"] >= 0
    assert row["max_global_load_bits"] == 128 and row["loop_barriers"] == 0


@needs_toolchain
def test_headline_variants_vectorised_without_spills_or_loop_barriers():
    """The issue's criterion at bf16, V = 50,400 (one kind per pass; the epilogue is outside the loops)."""
    rows = _compiled_rows(50400, "bfloat16", ("apa", None))
    assert sorted(row["pass"] for row in rows) == ["backward", "forward", "forward_grad"]
    for row in rows:
        assert row["ok"] and row["spill_bytes"] == 0, row
        assert row["max_global_load_bits"] == 128, row
        assert row["loop_barriers"] == 0, row
        if row["pass"] != "forward":  # the forward stores four float32 numbers per row, nothing wider exists
            assert row["max_global_store_bits"] == 128, row


def test_sass_reading_on_a_synthetic_listing():
    sass = """
        /*0000*/                   LDG.E.U16 R3, desc[UR4][R2.64] ;
        /*0010*/              @!P0 BRA 0x90 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/                   STL.64 [R1], R4 ;
        /*0050*/              @P1 BRA 0x20 ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R3 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
    """
    assert aot.sass_facts(sass) == {"max_global_load_bits": 128, "max_global_store_bits": 16, "spill_bytes": 8,
                                    "loop_barriers": 1}


def test_rows_in_flight_of_forward_grad():
    row = aot.VariantReport("k", "forward_grad", "bfloat16", 50400, 16384, 32, programs=132)
    assert row.rows_in_flight_bytes(2) == 132 * 50400 * 2
    assert aot.VariantReport("k", "forward", "bfloat16", 50400, 4096, 8).rows_in_flight_bytes(2) is None


@needs_toolchain
@pytest.mark.parametrize("arch, message", [("foo", "expected a CUDA architecture such as sm_90"),
                                           ("sm_999", "not an architecture this Triton compiles for")])
def test_bad_architectures_give_one_line_errors(arch, message):
    result = _run("--aot", arch)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_json_needs_aot():
    result = _run("--json")
    assert result.returncode == 2 and "--json goes with --aot" in result.stderr


def test_aot_refuses_to_run_under_the_interpreter():
    if aot.toolchain_error() is not None:
        pytest.skip("the architecture check needs the toolchain")
    result = _run("--aot", "sm_90", interpret="1")
    assert result.returncode == 2 and "TRITON_INTERPRET=0" in result.stderr

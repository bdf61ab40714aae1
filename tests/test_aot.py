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
from apa_fast.kernels.logprob import MAX_GRAD_REGISTERS

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
    (loop,) = row["loops"]
    assert list(loop) == list(aot.LOOP_JSON_KEYS)
    assert loop["load_bits"] == 128 and loop["store_bits"] == 0 and loop["bytes_per_logit"] == 4
    assert loop["shuffles_per_logit"] == 0 and loop["barriers_per_logit"] == 0
    assert 0 < loop["instructions_per_logit"] < 40
    assert set(loop["issue_utilisation"]) == {gpu.name for gpu in aot.GPUS}


@needs_toolchain
def test_headline_variants_vectorised_without_spills_or_loop_barriers():
    """The issue's criterion at bf16, V = 50,400 (one kind per pass; the epilogue is outside the loops), with the
    entropy off and on."""
    rows = _compiled_rows(50400, "bfloat16", ("apa", None))
    assert sorted(row["pass"] for row in rows) == ["backward", "backward", "forward", "forward", "forward_grad",
                                                  "forward_grad"]
    assert sum(row["kernel"].endswith("+entropy") for row in rows) == 3
    for row in rows:
        assert row["ok"] and row["spill_bytes"] == 0, row
        # forward_grad: the log-sum-exp loop, then the gradient loop; the backward: the gradient loop.
        assert len(row["loops"]) == (2 if row["pass"] == "forward_grad" else 1), row
        for number, loop in enumerate(row["loops"], 1):
            assert loop["load_bits"] == 128, row
            writes = row["pass"] == "backward" or number == 2
            assert loop["store_bits"] == (128 if writes else 0), row
            assert loop["shuffles_per_logit"] == 0 and loop["barriers_per_logit"] == 0, row
            assert loop["bytes_per_logit"] == 2 * (1 + writes), row
            # The issue model: an H200 leaves fewer instructions per byte than an H100.
            h100, h200 = (loop["issue_utilisation"][gpu.name] for gpu in aot.GPUS)
            assert 0 < h100 < h200 < 1, row


@needs_toolchain
def test_odd_vocabularies_get_full_width_loop_accesses():
    """Issue 21 at GPT-2's V = 50,257 in bf16 (each row of logits[:, :-1] at another offset from a 16-byte
    boundary; `python -m apa_fast.info --aot sm_90 --vocab ...` reports the other vocabularies): every vocabulary
    loop still loads (and, into the ops' gradient buffer, stores) 128 bits with no shuffle or barrier, with no
    spills, at the instructions per logit of V = 50,400 (within 3%)."""
    aligned = {(row["pass"], row["kernel"]): row for row in _compiled_rows(50400, "bfloat16", ("apa", None))}
    rows = _compiled_rows(50257, "bfloat16", ("apa", None))
    assert len(rows) == len(aligned) == 6
    for row in rows:
        assert row["ok"] and row["spill_bytes"] == 0, row
        if row["pass"] == "forward_grad":  # what the persistent grid assumes when it counts CTAs per SM
            assert row["registers"] <= MAX_GRAD_REGISTERS, row
        twin = aligned[row["pass"], row["kernel"]]
        for loop, twin_loop in zip(row["loops"], twin["loops"], strict=True):
            assert loop["load_bits"] == 128 and loop["store_bits"] == twin_loop["store_bits"], row
            assert loop["shuffles_per_logit"] == 0 and loop["barriers_per_logit"] == 0, row
            assert loop["instructions_per_logit"] <= 1.03 * twin_loop["instructions_per_logit"], (row, twin)


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
    facts = aot.sass_facts(sass, logits_per_pass=8, itemsize=2)
    # The loop is 0x20-0x50: its load is the 128-bit one (the 16-bit load and store are outside it).
    assert facts == {"spill_bytes": 8, "loops": [aot.LoopReport(logits=8, itemsize=2, instructions=4, load_bits=128,
                                                                store_bits=0, shuffles=0, barriers=1)]}
    (loop,) = facts["loops"]
    assert loop.per_logit(loop.instructions) == 0.5 and loop.bytes_per_logit == 2
    h100 = aot.GPUS[0]
    assert loop.issue_utilisation(h100) == pytest.approx(0.25 / h100.instructions_per_byte)


def test_loopless_program_is_its_own_loop_and_row_accesses_outweigh_scalars():
    """A kernel without a loop (the backward: one block a program) is reported whole, up to its EXIT; its
    row accesses are the width carrying the most bytes, not the per-row scalars beside them."""
    sass = """
        /*0000*/                   LDG.E R3, desc[UR4][R2.64] ;
        /*0010*/                   MOV R5, R3 ;
        /*0020*/                   LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0030*/                   LDG.E.U16 R7, desc[UR4][R8.64+0x2] ;
        /*0040*/                   LDG.E.U16 R9, desc[UR4][R8.64+0x4] ;
        /*0050*/                   SHFL.BFLY PT, R10, R6, 0x1, 0x1f ;
        /*0060*/                   STG.E.U16 desc[UR4][R12.64], R6 ;
        /*0070*/                   NOP ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90 ;
    """
    (loop,) = aot.sass_facts(sass, logits_per_pass=2, itemsize=2)["loops"]
    assert (loop.load_bits, loop.store_bits, loop.shuffles, loop.barriers) == (16, 16, 1, 0)
    assert loop.instructions == 8 and loop.bytes_per_logit == 4  # the NOP and the trailing self-branch left out
    assert aot.LoopReport(1, 4, 10, 0, 0, 0, 0).issue_utilisation(h100 := aot.GPUS[0]) is None, h100


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


@pytest.mark.parametrize("flag", ["--json", "--vocab=32000", "--dtype=float32", "--kind=apa"])
def test_report_options_need_aot(flag):
    result = _run(flag)
    assert result.returncode == 2 and f"{flag.split('=')[0]} goes with --aot" in result.stderr


@pytest.mark.parametrize("flag, message", [("--vocab=0", "expected vocabulary sizes"),
                                           ("--dtype=float8", "expected dtypes among"),
                                           ("--kind=dpo", "expected kinds among")])
def test_report_options_are_checked(flag, message):
    result = _run("--aot", "sm_90", flag) if aot.toolchain_error() is None else _run("--json", flag)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, auto", [(("16384", "50400", "bf16"), "training mode"),
                                        (("16384", "151936", "bfloat16"), "two kernels"),
                                        (("4096", "128256", "fp32"), "two kernels")])
def test_design_report_names_the_design_auto_runs(args, auto):
    """``--design TOKENS V DTYPE``: the byte model's choice (an H100 where there is no GPU), both launches."""
    result = _run("--design", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"auto          {auto}:"), result.stdout
    assert lines[2].startswith("training mode (=1) BLOCK_V") and lines[3].startswith("two kernels (=0) BLOCK_V")


@pytest.mark.parametrize("args, message", [(("0", "50400", "bf16"), "TOKENS must be a positive integer"),
                                           (("16", "50k", "bf16"), "V must be a positive integer"),
                                           (("16", "50400", "int8"), "DTYPE must be one of")])
def test_design_report_checks_its_arguments(args, message):
    result = _run("--design", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_issue_model_figures():
    """32 threads x 4 schedulers x 132 SMs x 1.98 GHz against 3.35 and 4.8 TB/s."""
    assert [round(gpu.instructions_per_byte, 2) for gpu in aot.GPUS] == [9.99, 6.97]


def test_aot_refuses_to_run_under_the_interpreter():
    if aot.toolchain_error() is not None:
        pytest.skip("the architecture check needs the toolchain")
    result = _run("--aot", "sm_90", interpret="1")
    assert result.returncode == 2 and "TRITON_INTERPRET=0" in result.stderr

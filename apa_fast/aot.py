"""Ahead-of-time compile of every Triton kernel variant for a GPU architecture, without a GPU.

``python -m apa_fast.info --aot sm_90 [--json]`` runs `main` here. Each variant is compiled as it runs: the
launchers' own argument lists (`apa_fast.kernels.logprob.aot_variants`) go through Triton's runtime binder
for the target, so the divisibility specialisation a real call gets (16-byte aligned pointers, integer
arguments divisible by 16 such as V = 50,400 and its row strides, unit strides as constants) is the one
compiled; V = 50,257 shows the unaligned case. Per variant the report gives, from the cubin and its SASS
(``cuobjdump`` ships inside the Triton wheel):

* ``registers``: per thread (``cuobjdump --dump-resource-usage``);
* ``spill_bytes``: bytes of local-memory stores (``STL``) in the SASS, i.e. register spills (our kernels have
  no local arrays); a non-zero stack frame is reported as a failure too;
* ``shared_bytes``: the shared memory Triton allocates for the kernel;
* ``max_global_load_bits`` / ``max_global_store_bits``: the widest ``LDG``/``LDGSTS`` and ``STG`` (128 means
  vectorised 16-byte accesses);
* ``loop_barriers``: barrier instructions (``BAR.*``, ``SYNCS.*``) inside an innermost loop (a backward
  branch's range holding no other loop): the vocabulary loops (forward_grad's outer loop is over rows).

Exit status 1 if a variant fails to compile or spills.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

JSON_KEYS = ("kernel", "pass", "dtype", "vocab", "block_v", "num_warps", "registers", "spill_bytes", "shared_bytes",
             "max_global_load_bits", "max_global_store_bits", "loop_barriers")


class ToolchainMissing(RuntimeError):
    """Triton, or its NVIDIA backend and tools, is not installed."""


def _nvidia_bin(tool: str) -> str:
    try:
        import triton
    except Exception as exc:  # a broken triton raises more than ImportError
        raise ToolchainMissing(f"triton is not importable ({type(exc).__name__}: {exc})") from exc
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise ToolchainMissing(f"Triton's NVIDIA backend has no {tool} ({path})")
    return path


def toolchain_error() -> str | None:
    """Why the AOT report cannot run here, or None."""
    try:
        for tool in ("cuobjdump", "ptxas"):
            _nvidia_bin(tool)
    except ToolchainMissing as exc:
        return str(exc)
    return None


@functools.cache
def supported_archs() -> tuple[str, ...]:
    """The ``sm_N`` targets this Triton can compile for: those the bundled ptxas it picks for N accepts."""
    from triton.backends.nvidia.compiler import get_ptxas

    _nvidia_bin("ptxas")
    accepted: dict[str, set[int]] = {}  # ptxas path -> the sm_N it accepts
    archs = []
    for capability in range(75, 200):  # Triton's NVIDIA backend starts at Turing
        path = get_ptxas(capability).path
        if path not in accepted:
            help_text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60).stdout
            accepted[path] = {int(n) for n in re.findall(r"'sm_(\d+)'", help_text)}
        if capability in accepted[path]:
            archs.append(f"sm_{capability}")
    return tuple(archs)


def parse_arch(text: str) -> str:
    """argparse type of ``--aot``: ``sm_<capability>`` that Triton supports here, else a one-line error."""
    match = re.fullmatch(r"sm_(\d+)a?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a CUDA architecture such as sm_90, got {text!r}")
    problem = toolchain_error()
    if problem:
        raise argparse.ArgumentTypeError(f"cannot compile ahead of time: {problem}")
    arch = f"sm_{match.group(1)}"
    if arch not in supported_archs():
        raise argparse.ArgumentTypeError(f"{text} is not an architecture this Triton compiles for "
                                         f"(supported: {', '.join(supported_archs())})")
    return arch


@dataclasses.dataclass
class VariantReport:
    kernel: str
    pass_: str
    dtype: str
    vocab: int
    block_v: int
    num_warps: int
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    max_global_load_bits: int | None = None
    max_global_store_bits: int | None = None
    loop_barriers: int | None = None
    stack_bytes: int | None = None
    specialised: str = ""  # the integer arguments specialised as divisible by 16
    programs: int | None = None  # forward_grad's persistent grid on an H100
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0 and self.stack_bytes == 0

    def as_json(self) -> dict:
        values = dataclasses.asdict(self)
        values["pass"] = values.pop("pass_")
        return {key: values[key] for key in JSON_KEYS}

    def rows_in_flight_bytes(self, itemsize: int) -> int | None:
        """forward_grad: bytes of logit rows resident at once (one row per program of its persistent grid)."""
        return self.programs * self.vocab * itemsize if self.programs else None


# ----------------------------------------------------------------------------------------------------
# SASS reading.
# ----------------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _access_bits(opcode: str) -> int:
    """Width of a load/store from its modifiers: .128/.64, .U16/.S16, .U8/.S8, else 32 bits."""
    for modifier, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if modifier in opcode:
            return bits
    return 32


def sass_facts(sass: str) -> dict:
    """Widest global load/store (bits), spill-store bytes and barriers in innermost loops, from ``cuobjdump -sass``."""
    instructions = [(int(addr, 16), opcode, operands) for addr, opcode, operands in _SASS_LINE.findall(sass)]
    loops = []
    for addr, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:  # a backward branch closes a loop
            loops.append((int(target.group(1), 16), addr))
    innermost = [(lo, hi) for lo, hi in loops if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops)]
    facts = {"max_global_load_bits": 0, "max_global_store_bits": 0, "spill_bytes": 0, "loop_barriers": 0}
    for addr, opcode, _ in instructions:
        if opcode.startswith(("LDG", "LDGSTS")):
            facts["max_global_load_bits"] = max(facts["max_global_load_bits"], _access_bits(opcode))
        elif opcode.startswith("STG"):
            facts["max_global_store_bits"] = max(facts["max_global_store_bits"], _access_bits(opcode))
        elif opcode.startswith("STL"):
            facts["spill_bytes"] += _access_bits(opcode) // 8
        elif opcode.startswith(("BAR", "SYNCS")) and any(lo <= addr <= hi for lo, hi in innermost):
            facts["loop_barriers"] += 1
    return facts


def _cubin_tool(tool_args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([_nvidia_bin("cuobjdump"), *tool_args, fh.name], capture_output=True, text=True,
                              check=True, timeout=120).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    out = _cubin_tool(["--dump-resource-usage"], cubin)
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


# ----------------------------------------------------------------------------------------------------
# Compiling the launchers' variants.
# ----------------------------------------------------------------------------------------------------
def compile_variant(variant: dict, arch: str):
    """Compile one `aot_variants` launch for ``arch``: ``(compiled kernel, names of the args specialised /16)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", int(arch[3:]), 32)
    backend = triton.compiler.make_backend(target)
    kernel = variant["kernel"]
    # Triton's own binder: the runtime's specialisation of these very arguments (what `kernel[grid](...)` does).
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*variant["args"], **variant["meta"])
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(variant["meta"]), bound, specialization,
                                                              options)
    names = list(signature)
    divisible = [names[path[0]] for path, values in attrs.items()
                 if ["tt.divisibility", 16] in values and not signature[names[path[0]]].startswith("*")]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__), divisible


def report(arch: str = "sm_90", variants=None) -> list[VariantReport]:
    """One `VariantReport` per variant (default: every launch of `aot_variants()`), compiled for ``arch``."""
    from .kernels import logprob

    # Triton 3.9 warns that its FP-fusion default changes in 3.10; the kernels run with fusion (the test and
    # GPU scripts pin it too).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    for variant in (logprob.aot_variants() if variants is None else variants):
        kernel = variant["kernel"].__name__.strip("_")
        row = VariantReport(kernel=kernel + (f"[{variant['kind']}]" if variant["kind"] else ""),
                            pass_=variant["pass"], dtype=variant["dtype"], vocab=variant["vocab"],
                            block_v=variant["meta"]["BLOCK_V"], num_warps=variant["meta"]["num_warps"],
                            programs=variant["grid"][0] if variant["pass"] == "forward_grad" else None)
        try:
            compiled, divisible = compile_variant(variant, arch)
            cubin = compiled.asm["cubin"]
            usage = resource_usage(cubin)
            facts = sass_facts(_cubin_tool(["-sass"], cubin))
            row.registers, row.stack_bytes = usage.get("REG"), usage.get("STACK", 0) + usage.get("LOCAL", 0)
            row.shared_bytes = compiled.metadata.shared
            row.specialised = ",".join(divisible)
            for key, value in facts.items():
                setattr(row, key, value)
        except Exception as exc:  # report every variant, then fail
            row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        rows.append(row)
    return rows


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def format_table(rows: list[VariantReport], arch: str) -> str:
    lines = [
        f"Ahead-of-time compile for {arch}: every launch as the launchers make it for logits[:, :-1] of a "
        "contiguous (8, 512, V) buffer, with Triton's runtime specialisation (16-byte aligned pointers; "
        "integers divisible by 16 listed under 'specialised'). Loads/stores: widest global access in bits; "
        "loop barriers: barriers inside the vocabulary loops; L2 rows: forward_grad's logit rows resident at "
        "once on an H100 (its persistent grid there; 50 MB of L2).",
        "",
        "| kernel | pass | dtype | V | BLOCK_V | warps | registers | spill (B) | stack (B) | shared (B) "
        "| load bits | store bits | loop barriers | specialised | L2 rows (MB) | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in rows:
        in_flight = row.rows_in_flight_bytes(_ITEMSIZE[row.dtype]) if row.pass_ == "forward_grad" else None
        status = "ok" if row.ok else (row.error or "SPILLS")
        cells = [row.kernel, row.pass_, row.dtype, row.vocab, row.block_v, row.num_warps, row.registers,
                 row.spill_bytes, row.stack_bytes, row.shared_bytes, row.max_global_load_bits,
                 row.max_global_store_bits, row.loop_barriers, row.specialised or "-",
                 f"{in_flight / 1e6:.1f}" if in_flight else "-", status]
        lines.append("| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main(arch: str, *, as_json: bool = False) -> int:
    """Print the report for ``arch`` (a table, or JSON: a list of objects with `JSON_KEYS`); 1 on any failure."""
    from . import _dispatch

    if _dispatch.interpreter_enabled():
        print("--aot compiles for a real GPU target: run it with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    rows = report(arch)
    if as_json:
        print(json.dumps([row.as_json() for row in rows], indent=1))
    else:
        print(format_table(rows, arch))
    for row in rows:
        if not row.ok:
            print(f"{row.kernel} {row.pass_} {row.dtype} V={row.vocab}: {row.error or 'spills'}", file=sys.stderr)
    return 0 if all(row.ok for row in rows) else 1

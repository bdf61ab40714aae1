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
* ``loops``: each vocabulary loop itself, i.e. each innermost loop (a backward branch's range holding no other
  loop; forward_grad's outer loop is over rows), or the whole program of a kernel without a loop (the
  backward: one block of the vocabulary per program). Per loop (`LoopReport`): the widest global load and
  store inside it (``LDG``/``LDGSTS``, ``STG``; 128 means 16-byte accesses), and per logit: SASS instructions,
  shuffles (``SHFL``), barriers (``BAR.*``, ``SYNCS.*``) and global bytes, counted statically over the body
  (Triton does not unroll these loops: one pass of the body is one block of ``BLOCK_V`` logits, i.e.
  ``BLOCK_V / (32 * num_warps)`` a thread); and the share of the SM's issue rate that moving those bytes at
  full DRAM bandwidth needs (`IssueModel`: an H100 SXM and an H200; benchmarks/README.md states the model).

Exit status 1 if a variant fails to compile or spills.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

JSON_KEYS = ("kernel", "pass", "dtype", "vocab", "block_v", "num_warps", "registers", "spill_bytes", "shared_bytes",
             "loops")
LOOP_JSON_KEYS = ("load_bits", "store_bits", "instructions_per_logit", "shuffles_per_logit", "barriers_per_logit",
                  "bytes_per_logit", "issue_utilisation")


@dataclasses.dataclass(frozen=True)
class IssueModel:
    """Issue rate against DRAM bandwidth: each of ``schedulers`` per SM issues one warp-instruction (32 thread
    instructions) a clock, so full bandwidth leaves ``32 * schedulers * sms * clock_hz / dram_bytes_per_s``
    thread instructions per byte moved."""

    name: str
    sms: int
    schedulers: int
    clock_hz: float
    dram_bytes_per_s: float

    @property
    def instructions_per_byte(self) -> float:
        return 32 * self.schedulers * self.sms * self.clock_hz / self.dram_bytes_per_s


# Boost clocks and HBM3/HBM3e bandwidths as NVIDIA states them; 9.99 and 6.97 thread instructions per byte.
GPUS = (IssueModel("H100 SXM", 132, 4, 1.98e9, 3.35e12), IssueModel("H200", 132, 4, 1.98e9, 4.8e12))


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
class LoopReport:
    """One vocabulary loop's body, counted per thread over one pass (``logits`` logits a thread).

    ``load_bits`` / ``store_bits``: the width of the row's accesses, i.e. of the global loads (stores) that carry
    the most bytes in the body (per-row scalars, loaded once per program, do not count); 0 when it has none.
    """

    logits: int
    itemsize: int  # the logits' element size
    instructions: int
    load_bits: int
    store_bits: int
    shuffles: int
    barriers: int

    def per_logit(self, count: int) -> float:
        return count / self.logits

    @property
    def bytes_per_logit(self) -> int:
        """Global bytes per logit: the logit read where the loop loads the row, its gradient where it stores."""
        return self.itemsize * (bool(self.load_bits) + bool(self.store_bits))

    def issue_utilisation(self, gpu: IssueModel) -> float | None:
        """Thread instructions per global byte over what ``gpu`` can issue per byte at full DRAM bandwidth.

        Counts every byte the loop loads or stores as DRAM traffic: for forward_grad's second loop, whose
        re-read of the row hits L2 by design, the DRAM bytes are its stores alone, so its figure is a floor.
        """
        if not self.bytes_per_logit:
            return None
        return self.per_logit(self.instructions) / self.bytes_per_logit / gpu.instructions_per_byte

    def as_json(self) -> dict:
        return {"load_bits": self.load_bits, "store_bits": self.store_bits,
                "instructions_per_logit": self.per_logit(self.instructions),
                "shuffles_per_logit": self.per_logit(self.shuffles),
                "barriers_per_logit": self.per_logit(self.barriers),
                "bytes_per_logit": self.bytes_per_logit,
                "issue_utilisation": {gpu.name: self.issue_utilisation(gpu) for gpu in GPUS}}


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
    loops: list[LoopReport] = dataclasses.field(default_factory=list)
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
        values["loops"] = [loop.as_json() for loop in self.loops]
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


def _sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction but NOPs (alignment padding)."""
    return [(int(addr, 16), opcode, operands) for addr, opcode, operands in _SASS_LINE.findall(sass)
            if opcode != "NOP"]


def vocabulary_loops(instructions) -> list[tuple[int, int]]:
    """Address ranges of the innermost loops, or of the whole program when it has no loop."""
    loops = []
    for addr, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:  # a backward branch closes a loop
            loops.append((int(target.group(1), 16), addr))
    innermost = [(lo, hi) for lo, hi in loops if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in loops)]
    if innermost or not instructions:
        return sorted(innermost)
    # No loop: the program ends at its EXIT (what follows is the trap/self-branch Triton appends).
    exits = [addr for addr, opcode, _ in instructions if opcode == "EXIT"]
    return [(instructions[0][0], max(exits) if exits else instructions[-1][0])]


def _row_access_bits(widths: list[int]) -> int:
    """The width whose accesses carry the most bytes (the row's, whatever scalars sit beside it); 0 if none."""
    carried = collections.Counter()
    for bits in widths:
        carried[bits] += bits
    return max(carried, key=lambda bits: (carried[bits], bits)) if carried else 0


def loop_facts(body, logits: int, itemsize: int) -> LoopReport:
    """A `LoopReport` of the instructions ``body`` (one pass of a loop), which handle ``logits`` per thread."""
    loads = [_access_bits(op) for _, op, _ in body if op.startswith(("LDG", "LDGSTS"))]
    stores = [_access_bits(op) for _, op, _ in body if op.startswith("STG")]
    return LoopReport(logits=logits, itemsize=itemsize, instructions=len(body), load_bits=_row_access_bits(loads),
                      store_bits=_row_access_bits(stores), shuffles=sum(op.startswith("SHFL") for _, op, _ in body),
                      barriers=sum(op.startswith(("BAR", "SYNCS")) for _, op, _ in body))


def sass_facts(sass: str, logits_per_pass: int = 1, itemsize: int = 2) -> dict:
    """Spill-store bytes (``STL``) and the `LoopReport` of each vocabulary loop, from ``cuobjdump -sass``;
    ``logits_per_pass``: the logits one thread handles per pass of a loop (``BLOCK_V / (32 * num_warps)``),
    ``itemsize`` their element size."""
    instructions = _sass_instructions(sass)
    loops = [loop_facts([ins for ins in instructions if lo <= ins[0] <= hi], logits_per_pass, itemsize)
             for lo, hi in vocabulary_loops(instructions)]
    spills = sum(_access_bits(op) // 8 for _, op, _ in instructions if op.startswith("STL"))
    return {"spill_bytes": spills, "loops": loops}


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
        # "+entropy": the kernel compiled with its ENTROPY switch on (the same pass with the entropy beside it).
        name = kernel + (f"[{variant['kind']}]" if variant["kind"] else "") + ("+entropy" if variant["entropy"] else "")
        row = VariantReport(kernel=name,
                            pass_=variant["pass"], dtype=variant["dtype"], vocab=variant["vocab"],
                            block_v=variant["meta"]["BLOCK_V"], num_warps=variant["meta"]["num_warps"],
                            programs=variant["grid"][0] if variant["pass"] == "forward_grad" else None)
        try:
            compiled, divisible = compile_variant(variant, arch)
            cubin = compiled.asm["cubin"]
            usage = resource_usage(cubin)
            facts = sass_facts(_cubin_tool(["-sass"], cubin), row.block_v // (32 * row.num_warps),
                               _ITEMSIZE[row.dtype])
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
    """Two markdown tables: one line per variant (resources), then one per vocabulary loop (its body)."""
    lines = [
        f"Ahead-of-time compile for {arch}: every launch as the launchers make it for logits[:, :-1] of a "
        "contiguous (8, 512, V) buffer, with Triton's runtime specialisation (16-byte aligned pointers; "
        "integers divisible by 16 listed under 'specialised'). L2 rows: forward_grad's logit rows resident at "
        "once on an H100 (its persistent grid there; 50 MB of L2).",
        "",
        "| kernel | pass | dtype | V | BLOCK_V | warps | registers | spill (B) | stack (B) | shared (B) "
        "| specialised | L2 rows (MB) | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in rows:
        in_flight = row.rows_in_flight_bytes(_ITEMSIZE[row.dtype]) if row.pass_ == "forward_grad" else None
        status = "ok" if row.ok else (row.error or "SPILLS")
        cells = [row.kernel, row.pass_, row.dtype, row.vocab, row.block_v, row.num_warps, row.registers,
                 row.spill_bytes, row.stack_bytes, row.shared_bytes, row.specialised or "-",
                 f"{in_flight / 1e6:.1f}" if in_flight else "-", status]
        lines.append("| " + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
    return "\n".join(lines + ["", *loop_table(rows)])


def loop_table(rows: list[VariantReport]) -> list[str]:
    """One markdown line per vocabulary loop: its widest accesses and, per logit, what its body issues."""
    issue = " | ".join(f"issue at {gpu.name} BW" for gpu in GPUS)
    lines = [
        "Vocabulary loops (loop n of the kernel; a kernel without a loop: its program, one block): the width of "
        "the row's loads and stores in the loop (bits; 0: none), and per logit its SASS instructions, shuffles, "
        "barriers and global bytes (the logit read, its gradient written); 'issue at X BW': the share of the "
        "SM's issue rate the loop needs to move those bytes at X's full DRAM bandwidth (over 100%: it cannot; "
        + ", ".join(
            f"{gpu.name} {gpu.instructions_per_byte:.2f} instructions per byte" for gpu in GPUS) + ").",
        "",
        f"| kernel | pass | dtype | V | loop | load bits | store bits | SASS/logit | SHFL/logit | BAR/logit "
        f"| bytes/logit | {issue} |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(GPUS),
    ]
    for row in rows:
        for number, loop in enumerate(row.loops, 1):
            cells = [row.kernel, row.pass_, row.dtype, row.vocab, number, loop.load_bits, loop.store_bits,
                     f"{loop.per_logit(loop.instructions):.2f}", f"{loop.per_logit(loop.shuffles):.2f}",
                     f"{loop.per_logit(loop.barriers):.2f}", loop.bytes_per_logit,
                     *(_percent(loop.issue_utilisation(gpu)) for gpu in GPUS)]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


DTYPES = ("bfloat16", "float16", "float32")


def parse_list(kind: str, choices=None):
    """argparse type of the comma-separated ``--vocab`` (positive ints), ``--dtype`` and ``--kind`` lists."""

    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if kind == "vocab":
            if not items or not all(item.isdigit() and int(item) > 0 for item in items):
                raise argparse.ArgumentTypeError(f"expected vocabulary sizes such as 32000,50257, got {text!r}")
            return tuple(int(item) for item in items)
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected {kind}s among {', '.join(choices)}, got {text!r}")
        return tuple(items)

    return parse


def selected_variants(vocabs=None, dtypes=None, kinds=None) -> list[dict]:
    """`aot_variants` restricted to the given vocabularies, dtype names and loss-kind names (None: its default;
    the backward, which has no kind, is always included)."""
    import torch

    from .kernels import logprob
    from .kinds import KINDS

    options = {}
    if vocabs:
        options["vocabs"] = tuple(vocabs)
    if dtypes:
        options["dtypes"] = tuple(getattr(torch, name) for name in dtypes)
    if kinds:
        options["kinds"] = tuple(kind for kind in KINDS if kind.name in kinds)
    return list(logprob.aot_variants(**options))


def main(arch: str, *, as_json: bool = False, vocabs=None, dtypes=None, kinds=None) -> int:
    """Print the report for ``arch`` (a table, or JSON: a list of objects with `JSON_KEYS`, each loop with
    `LOOP_JSON_KEYS`) over `selected_variants`; 1 on any failure."""
    from . import _dispatch

    if _dispatch.interpreter_enabled():
        print("--aot compiles for a real GPU target: run it with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    rows = report(arch, selected_variants(vocabs, dtypes, kinds))
    if as_json:
        print(json.dumps([row.as_json() for row in rows], indent=1))
    else:
        print(format_table(rows, arch))
    for row in rows:
        if not row.ok:
            print(f"{row.kernel} {row.pass_} {row.dtype} V={row.vocab}: {row.error or 'spills'}", file=sys.stderr)
    return 0 if all(row.ok for row in rows) else 1

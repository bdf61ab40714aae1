"""``python -m apa_fast.info [--aot sm_90]``: what this installation can run, and why not where it cannot.

Without arguments: versions, the device, where the compiled extension came from (installed, cached
just-in-time build, failed build with the compiler's output, disabled, or not built yet), and which backend
each op picks here. With ``--aot ARCH``: compiles every Triton kernel variant ahead of time for
that GPU architecture (no GPU needed) and prints registers, shared memory and spills per kernel and block
size, read from the cubin with the ``cuobjdump`` that ships inside the Triton wheel. Exits 1 if any
variant fails to compile or spills (stack or local memory above zero).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from . import __version__, _dispatch


def _module_version(name: str) -> str:
    try:  # the installed distribution's metadata: no heavy import
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> str:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines = [
        f"apa_fast      {__version__}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton        {_module_version('triton')} ({_dispatch.triton_status()[1]})",
        f"transformers  {_module_version('transformers')}",
        f"deepspeed     {_module_version('deepspeed')}",
        f"device        {torch.cuda.get_device_name() if cuda else 'cpu'} "
        f"({torch.get_num_threads()} CPU threads)",
        f"interpreter   TRITON_INTERPRET={'1' if _dispatch.interpreter_enabled() else '0'}",
        *_extension_lines(_dispatch.extension_status(build=False)),
        f"loss backend  auto -> {_dispatch.pick_loss_backend('auto', device)} on {device.type}",
        f"gae backend   auto -> {_dispatch.pick_gae_backend('auto', device, build=False)} on {device.type}",
    ]
    return "\n".join(lines)


def _extension_lines(status: _dispatch.ExtensionStatus) -> list[str]:
    """Where the compiled extension came from, then its detail (a failed build's compiler output, last lines)
    indented. Looks without building: the report never starts a compile."""
    head = f"extension     {status.origin}" + (f": {status.path}" if status.path else "")
    if status.origin == "failed build":
        head += " (`python -m apa_fast.build` retries); compiler output:"
    return [head, *(f"    {line}" for line in status.detail.rstrip().splitlines()[-30:])]


@dataclass
class KernelResources:
    label: str
    registers: int
    stack: int
    local: int
    shared: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stack == 0 and self.local == 0


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def aot_report(arch: str = "sm_90") -> list[KernelResources]:
    """Compile every kernel variant for ``arch`` (e.g. "sm_90") without a GPU; one row per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import logprob

    capability = int(arch.removeprefix("sm_"))
    target = GPUTarget("cuda", capability, 32)
    backend = triton.compiler.make_backend(target)
    rows = []
    for kernel, signature, constexprs, num_warps, label in logprob.aot_variants():
        label = f"{kernel.__name__.strip('_')} {label} warps={num_warps}"
        try:
            options = backend.parse_options({"num_warps": num_warps})
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=target, options=options.__dict__)
            usage = _resource_usage(compiled.asm["cubin"])
            rows.append(KernelResources(label, usage.get("REG", -1), usage.get("STACK", 0), usage.get("LOCAL", 0),
                                        compiled.metadata.shared))
        except Exception as exc:  # report every variant, then fail
            rows.append(KernelResources(label, -1, -1, -1, -1, error=f"{type(exc).__name__}: {exc}"))
    return rows


def format_aot(rows: list[KernelResources], arch: str) -> str:
    lines = [f"Ahead-of-time compile for {arch}",
             "| kernel variant | registers | shared (B) | stack (B) | local (B) | status |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        status = "ok" if row.ok else (row.error or "SPILLS")
        lines.append(f"| {row.label} | {row.registers} | {row.shared} | {row.stack} | {row.local} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apa_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--aot", metavar="ARCH", help="compile every Triton kernel for ARCH (e.g. sm_90)")
    args = parser.parse_args(argv)
    print(environment_report())
    if not args.aot:
        return 0
    if _dispatch.interpreter_enabled():
        print("--aot compiles for a real GPU target: run it with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    rows = aot_report(args.aot)
    print()
    print(format_aot(rows, args.aot))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

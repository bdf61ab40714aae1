"""``python -m apa_fast.info [--aot sm_90]``: what this installation can run, and why not where it cannot.

Without arguments: versions, the device, where the compiled extension came from (installed, cached
just-in-time build, failed build with the compiler's output, unusable cache and why, disabled, or not built
yet, saying why a stale cached build is not used), and which backend each op picks here. With ``--aot ARCH
[--json]``: compiles every Triton kernel variant ahead of time for that GPU architecture (no GPU needed) as
the launchers run it, and reports registers, spills, shared memory, the widest global loads and stores and the
barriers inside the vocabulary loops (`apa_fast.aot`). Exits 1 if any variant fails to compile or spills.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

from . import __version__, _dispatch, aot
from .kinds import KINDS

KIND_NAMES = tuple(kind.name for kind in KINDS)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apa_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--aot", metavar="ARCH", type=aot.parse_arch,
                        help="compile every Triton kernel variant for ARCH (e.g. sm_90) and report its resources")
    parser.add_argument("--json", action="store_true", help="with --aot: the report as JSON, nothing else")
    parser.add_argument("--vocab", type=aot.parse_list("vocab"), metavar="V[,V...]",
                        help="with --aot: these vocabulary sizes (default: the launchers' AOT list)")
    parser.add_argument("--dtype", type=aot.parse_list("dtype", aot.DTYPES), metavar="DTYPE[,...]",
                        help=f"with --aot: these logits dtypes among {', '.join(aot.DTYPES)} (default: all)")
    parser.add_argument("--kind", type=aot.parse_list("kind", KIND_NAMES), metavar="KIND[,...]",
                        help=f"with --aot: these loss kinds among {', '.join(KIND_NAMES)} (default: all; the "
                             "backward is always compiled)")
    args = parser.parse_args(argv)
    for flag in ("json", "vocab", "dtype", "kind"):
        if getattr(args, flag) and not args.aot:
            parser.error(f"--{flag} goes with --aot")
    if not args.json:
        print(environment_report())
    if not args.aot:
        return 0
    if not args.json:
        print()
    return aot.main(args.aot, as_json=args.json, vocabs=args.vocab, dtypes=args.dtype, kinds=args.kind)


if __name__ == "__main__":
    sys.exit(main())

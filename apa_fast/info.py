"""``python -m apa_fast.info [--aot sm_90]``: what this installation can run, and why not where it cannot.

Without arguments: versions, the device, where the compiled extension came from (installed, cached
just-in-time build, failed build with the compiler's output, unusable cache and why, disabled, or not built
yet, saying why a stale cached build is not used), and which backend each op picks here. With ``--aot ARCH
[--json]``: compiles every Triton kernel variant ahead of time for that GPU architecture (no GPU needed) as
the launchers run it, and reports registers, spills, shared memory, the widest global loads and stores and the
barriers inside the vocabulary loops (`apa_fast.aot`). Exits 1 if any variant fails to compile or spills.
With ``--design TOKENS V DTYPE``: which gradient design ``APA_FAST_FUSED_GRAD=auto`` runs on Triton for that
many token rows of V logits, and both designs' launches and DRAM bytes under the byte model
(`apa_fast.kernels.logprob.design`), for this machine's GPU or, without one, an H100 SXM (132 SMs, 50 MB L2).
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


def design_report(tokens: int, vocab: int, dtype_name: str, device: torch.device | None = None) -> str:
    """The gradient designs for ``tokens`` x ``vocab`` logits of ``dtype_name`` on ``device`` (default: the first
    GPU, else an H100 SXM's SMs and L2): which one ``auto`` runs, their launches and DRAM bytes."""
    from .kernels import logprob as kernels

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sms, l2_bytes = kernels.device_limits(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU here: an H100 SXM"
    itemsize = getattr(torch, dtype_name).itemsize
    d = kernels.design(tokens, vocab, itemsize, sms, l2_bytes)
    logits_gb = tokens * vocab * itemsize / 1e9
    block, warps = kernels.block_config(vocab)
    return "\n".join([
        f"design        {tokens} tokens x V = {vocab} {dtype_name} ({where}: {sms} SMs, {l2_bytes / 2**20:.0f} MiB L2; "
        f"L = {logits_gb:.3f} GB)",
        f"auto          {'training mode' if d.training_mode else 'two kernels'}: "
        f"{kernels.l2_rows(vocab * itemsize, l2_bytes)} rows of {vocab * itemsize / 1e3:.1f} KB stay in "
        f"{kernels.L2_BUDGET:.0%} of the L2, {'' if d.training_mode else 'not '}enough to keep "
        f"{kernels.MIN_SM_SHARE:.0%} of the {sms} SMs streaming",
        f"training mode (=1) BLOCK_V {d.block_v}, {d.num_warps} warps, {d.programs} programs (up to "
        f"{d.ctas_per_sm} per SM, {min(d.programs, sms)} of {sms} SMs streaming), rows in flight "
        f"{d.rows_in_flight_bytes / 1e6:.1f} MB; DRAM {d.training_mode_bytes}L = "
        f"{d.training_mode_bytes * logits_gb:.2f} GB (+2L on a step whose upstream gradient is not a power of two "
        f"or differs from the previous step's)",
        f"two kernels (=0) BLOCK_V {block}, {warps} warps, one program per row (forward, then backward); "
        f"DRAM 3L = {3 * logits_gb:.2f} GB",
    ])


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
    parser.add_argument("--design", nargs=3, metavar=("TOKENS", "V", "DTYPE"),
                        help="which gradient design runs for TOKENS x V logits of DTYPE (bfloat16/bf16, float16/fp16, "
                             "float32/fp32), and why")
    args = parser.parse_args(argv)
    if args.design:
        try:
            tokens, vocab, dtype_name = _design_args(*args.design)
        except ValueError as exc:
            parser.error(f"--design: {exc}")
        print(design_report(tokens, vocab, dtype_name))
        return 0
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


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _design_args(tokens: str, vocab: str, dtype: str) -> tuple[int, int, str]:
    """``--design``'s (tokens, V, dtype name), or ValueError naming the bad one."""
    if not tokens.isdigit() or int(tokens) < 1:
        raise ValueError(f"TOKENS must be a positive integer, got {tokens!r}")
    if not vocab.isdigit() or int(vocab) < 1:
        raise ValueError(f"V must be a positive integer, got {vocab!r}")
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in aot.DTYPES:
        raise ValueError(f"DTYPE must be one of {', '.join(aot.DTYPES)} (or bf16, fp16, fp32), got {dtype!r}")
    return int(tokens), int(vocab), name


if __name__ == "__main__":
    sys.exit(main())

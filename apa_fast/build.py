"""``python -m apa_fast.build [--force]``: build the compiled extension ahead of time, into the cache.

Builds what the first `apa_fast.gae` call would build just in time (the C++ CPU kernel, and the CUDA kernel
when torch is a CUDA build and nvcc is found), so that a cluster job does not pay for it: run it once per
environment, with APA_FAST_CACHE_DIR pointing at a shared directory if the nodes share one. A finished build
that loads is kept (``--force`` rebuilds it); a failed, stale (torn or changed: it does not match its manifest)
or unloadable one is rebuilt. Exits 1 when the build fails (the compiler's output is printed) or the cache
cannot be used (one line), 2 when APA_FAST_NO_EXT=1 switches the extension off.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from . import _ext_build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apa_fast.build", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build is cached")
    args = parser.parse_args(argv)
    if os.environ.get("APA_FAST_NO_EXT", "0") not in ("", "0"):
        print("apa_fast: APA_FAST_NO_EXT=1 switches the compiled extension off: unset it to build",
              file=sys.stderr)
        return 2
    build_plan = _ext_build.plan()
    if build_plan.no_cuda_reason:
        print(f"apa_fast: CPU kernel only: {build_plan.no_cuda_reason}")
    start = time.perf_counter()
    try:
        compiled = _ext_build.build(build_plan, force=args.force)
    except _ext_build.BuildFailed as exc:
        print(f"apa_fast: the build failed; compiler output:\n{exc}", file=sys.stderr)
        return 1
    except _ext_build.CacheUnusable as exc:
        print(f"apa_fast: {exc}", file=sys.stderr)
        return 1
    verb = f"built in {time.perf_counter() - start:.1f} s" if compiled else "already built"
    print(f"apa_fast: {build_plan.describe()} {verb}: {build_plan.directory}")
    if importlib.util.find_spec("apa_fast._C") is not None:
        print("apa_fast: note: the installed apa_fast._C is used in preference while it loads")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One forward+backward of `apa_fast.loss` per design at the headline shape, for a profiler to count DRAM bytes.

``gpu_run.sh`` runs it under Nsight Compute (when ``ncu`` is installed) with the counters that decide between
the designs: ``dram__bytes_read.sum`` / ``dram__bytes_write.sum`` per kernel and the L2 hit rate
(``lts__t_sector_hit_rate.pct``). The training-mode kernel's re-read of each row should hit L2: its DRAM reads
should be about L (1.65 GB), not 2L. Without a GPU it exits with a message.

    ncu --kernel-name regex:logprob --metrics dram__bytes_read.sum,... python -m benchmarks.dram_probe
"""

from __future__ import annotations

import os
import sys

import torch

import apa_fast
from benchmarks.logprob_providers import HEADLINE, LAM


def main() -> int:
    if not torch.cuda.is_available():
        print("dram_probe: no GPU", file=sys.stderr)
        return 1
    n, v = HEADLINE["tokens"], HEADLINE["vocab"]
    logits = (torch.randn(n, v, dtype=torch.bfloat16, device="cuda") * 2).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    ref_logprobs = -9.0 - 4.0 * torch.rand(n, device="cuda")
    advantages = torch.randn(n, device="cuda")
    for design, name in (("0", "two kernels"), ("1", "training mode")):
        os.environ["APA_FAST_FUSED_GRAD"] = design
        loss = apa_fast.loss(logits, labels, ref_logprobs, advantages, lam=LAM)
        (grad,) = torch.autograd.grad(loss, logits)
        torch.cuda.synchronize()
        print(f"dram_probe: {name} (APA_FAST_FUSED_GRAD={design}): loss {loss.item():.6g}, "
              f"|grad| {grad.float().norm().item():.6g}")
        del loss, grad
    return 0


if __name__ == "__main__":
    sys.exit(main())

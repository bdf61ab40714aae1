"""Worst relative errors of the fused ops against the float64 oracle, per backend, dtype and op.

Run: python tests/accuracy_report.py [--draws N]   (CPU: Triton under the interpreter; CUDA tensors on a GPU)
Prints a markdown table; the figures quoted in the README and the issue notes come from it.
"""

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0" if "--cuda" in sys.argv else "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from conftest import rel_err  # noqa: E402
from oracles import KINDS, make_inputs, oracle, run_fused  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="run on the GPU (compiled Triton)")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    print("| backend | dtype | op | worst value rel. err | worst grad rel. err |")
    print("|---|---|---|---:|---:|")
    for backend in ("triton", "torch"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for kind in KINDS:
                worst_value = worst_grad = 0.0
                for _ in range(args.draws):
                    rows_shape = tuple(int(n) for n in torch.randint(1, 9, (2,)))
                    vocab = int(torch.randint(2, 60000, ()))
                    logits, labels, aux, adv, mask, weights = (
                        t.to(device) for t in make_inputs(rows_shape, vocab, dtype=dtype))
                    mask = None if kind == "logprobs" else mask
                    want = oracle(kind, logits, labels, aux, adv, mask, weights=weights, temperature=0.9)
                    got = run_fused(kind, backend, logits, labels, aux, adv, mask, weights=weights, temperature=0.9)
                    worst_value = max(worst_value, rel_err(got[0], want[0]))
                    worst_grad = max(worst_grad, rel_err(got[1], want[1]))
                print(f"| {backend} | {str(dtype)[6:]} | {kind} | {worst_value:.1e} | {worst_grad:.1e} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()

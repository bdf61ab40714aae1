"""Worst relative errors of the fused ops against the float64 oracle, per backend, dtype and op.

Run: python tests/accuracy_report.py [--draws N] [--entropy]   (CPU: Triton under the interpreter; CUDA tensors
on a GPU). Prints a markdown table; the figures quoted in the README and the issue notes come from it.
``--entropy``: the entropy instead (issue 20): per op, backend and gradient design, the worst relative error of
the entropy and of the gradient of ``sum(w * output) + sum(u * entropy)`` (log-probs) or of the loss with
``entropy_coef=0.3`` (the losses), float32, random shapes, T = 0.9.
"""

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0" if "--cuda" in sys.argv else "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from conftest import rel_err  # noqa: E402
from oracles import IGNORE, KINDS, make_inputs, oracle, run_fused  # noqa: E402

import apa_fast  # noqa: E402

LOGITS_OPS = {"logprobs": apa_fast.logprobs, "apa": apa_fast.loss, "ppo": apa_fast.ppo_loss, "awr": apa_fast.awr_loss}
LINEAR_OPS = {"logprobs": apa_fast.linear_logprobs, "apa": apa_fast.linear_loss, "ppo": apa_fast.linear_ppo_loss,
              "awr": apa_fast.linear_awr_loss}


def _entropy_errors(kind, backend, linear, device):
    """(entropy rel. err, gradient rel. err) of one random draw; the gradient is the logits' (or hidden's)."""
    rows_shape = tuple(int(n) for n in torch.randint(1, 9, (2,)))
    vocab = int(torch.randint(2, 6000, ()))
    logits, labels, aux, adv, mask, weights = (t.to(device) for t in make_inputs(rows_shape, vocab))
    entropy_weights = torch.randn(rows_shape, device=device)
    mask = None if kind == "logprobs" else mask
    data = {"logprobs": (), "apa": (aux, adv, mask), "ppo": (aux, adv, mask), "awr": (adv, mask)}[kind]
    options = dict(temperature=0.9, ignore_index=IGNORE, backend=backend, return_entropy=True)
    if kind != "logprobs":
        options["entropy_coef"] = 0.3
    if linear:  # logits = hidden @ weight.T: the oracle differentiates through the projection in float64
        hidden, weight = torch.randn(*rows_shape, 16, device=device), torch.randn(vocab, 16, device=device) / 2
        leaf, other = hidden.clone().requires_grad_(), weight
        out, entropy = LINEAR_OPS[kind](leaf, other, labels, *data, **options)
        hidden64 = hidden.double().requires_grad_()
        logits64 = hidden64 @ weight.double().T
        logits = logits64.detach().float()
    else:
        leaf = logits.clone().requires_grad_()
        out, entropy = LOGITS_OPS[kind](leaf, labels, *data, **options)
    scalar = out if out.dim() == 0 else (out * weights).sum()
    if kind == "logprobs":
        scalar = scalar + (entropy * entropy_weights).sum()
    scalar.backward()
    want_out, want_entropy, want_grad = oracle(
        kind, (logits64.detach() if linear else logits), labels, aux, adv, mask, weights=weights, temperature=0.9,
        entropy_coef=options.get("entropy_coef", 0.0), with_entropy=True,
        entropy_weights=entropy_weights if kind == "logprobs" else None)
    if linear:
        logits64.backward(want_grad)
        want_grad = hidden64.grad
    return rel_err(entropy, want_entropy), rel_err(leaf.grad, want_grad)


def entropy_table(draws, device):
    print("| op | backend | design | worst entropy rel. err | worst grad rel. err |")
    print("|---|---|---|---:|---:|")
    for linear in (False, True):
        for kind in LOGITS_OPS:
            name = ("linear_" if linear else "") + {"logprobs": "logprobs", "apa": "loss"}.get(kind, f"{kind}_loss")
            for backend in ("triton", "torch"):
                # The linear ops pick their design by reduction (scalar: gradients in the forward); the logits ops
                # by APA_FAST_FUSED_GRAD, where a scalar loss has both designs.
                designs = ("0", "1") if not linear and kind != "logprobs" else ("-",)
                for design in designs:
                    os.environ["APA_FAST_FUSED_GRAD"] = design if design != "-" else "auto"
                    errors = [_entropy_errors(kind, backend, linear, device) for _ in range(draws)]
                    label = {"0": "two kernels", "1": "training mode", "-": "-"}[design]
                    print(f"| {name} | {backend} | {label} | {max(e[0] for e in errors):.1e} | "
                          f"{max(e[1] for e in errors):.1e} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="run on the GPU (compiled Triton)")
    parser.add_argument("--entropy", action="store_true", help="the entropy's table (issue 20)")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    if args.entropy:
        return entropy_table(args.draws, device)
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

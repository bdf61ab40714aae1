"""Accuracy of every benchmark provider against float64: ``python -m benchmarks.accuracy [--out FILE]``.

Three tables, each on one set of random inputs per dtype (bf16 and fp32 logits or hidden states; the float64
oracle sees the same, already rounded, inputs):

* log-probs of the labels and the clipped-PPO gradient from logits, ``(4, 256, 32,000)``: max |error| of the
  log-probs, and the relative L2 error of d(loss)/d(logits) where the provider's log-probs go through the
  PPO surrogate as TRL's and OpenRLHF's loss writes it (`benchmarks.baselines.ppo_from_logprobs`, float32
  per-token inputs); ``apa_fast`` is `apa_fast.ppo_loss` itself;
* the same from hidden states, ``hidden (4, 128, 256)``, ``weight (32,000, 256)``: the relative L2 error of the
  gradients of hidden and weight together (``apa_fast.linear_ppo_loss``, Liger's fused-linear GRPO loss,
  cut-cross-entropy's log-probs, matmul + plain eager);
* GAE (float32, 64 x 512, gamma 1, lam 0.95): the max |error| of the advantages at counted positions for a
  right-padded mask and for a mask with holes (observation tokens skipped, as verl does), against the
  float64 recurrence written from the definition.

Old log-probs are the float64 ones plus N(0, 0.1) noise (ratios near 1, some clipped at eps 0.2); advantages
N(0, 1); 1 in 8 tokens masked out. CPU; Triton does not run here, so apa_fast is its torch backend.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

import apa_fast
from benchmarks import baselines, peers
from benchmarks.records import DEFAULT_RESULTS_DIR

CLIP_EPS, GAMMA, LAM = 0.2, 1.0, 0.95
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _oracle_logprobs(logits, labels):
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _relative_l2(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _token_data(shape, oracle_logp, generator):
    old = (oracle_logp.detach() + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()
    advantages = torch.randn(shape, generator=generator)
    mask = torch.rand(shape, generator=generator) > 0.125
    return old, advantages, mask


def _ppo(logp, old, advantages, mask):
    return baselines.ppo_from_logprobs(logp, old, advantages, mask, clip_eps=CLIP_EPS)


# ----------------------------------------------------------------------------------------------------
# From logits.
# ----------------------------------------------------------------------------------------------------
def logits_providers() -> dict:
    """``{name: fn(logits (B, T, V), labels, old, adv, mask) -> (logp (B, T), PPO loss)}``."""

    def through_logprobs(logprobs_of):
        def run(logits, labels, old, adv, mask):
            logp = logprobs_of(logits, labels)
            return logp, _ppo(logp, old, adv, mask)
        return run

    def fused(logits, labels, old, adv, mask):
        loss = apa_fast.ppo_loss(logits, labels, old, adv, mask, clip_eps=CLIP_EPS)
        return apa_fast.logprobs(logits.detach(), labels), loss

    providers = {"apa_fast": fused, "eager": through_logprobs(baselines.logprobs)}
    providers.update({name: through_logprobs(fn) for name, fn in peers.logprob_providers().items()})
    return providers


def logits_rows(dtype, generator, shape=(4, 256, 32000)) -> list[tuple]:
    logits = (2 * torch.randn(shape, generator=generator)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    x64 = logits.double().requires_grad_()
    want_logp = _oracle_logprobs(x64, labels)
    old, adv, mask = _token_data(shape[:-1], want_logp, generator)
    (want_grad,) = torch.autograd.grad(_ppo(want_logp, old.double(), adv.double(), mask), x64)
    rows = []
    for name, run in logits_providers().items():
        x = logits.clone().requires_grad_()
        logp, loss = run(x, labels, old, adv, mask)
        (grad,) = torch.autograd.grad(loss, x)
        rows.append((name, (logp.double() - want_logp.detach()).abs().max().item(), _relative_l2(grad, want_grad),
                     str(logp.dtype).removeprefix("torch.")))
    return rows


# ----------------------------------------------------------------------------------------------------
# From hidden states.
# ----------------------------------------------------------------------------------------------------
def linear_providers() -> dict:
    """``{name: fn(hidden (B, T, H), weight (V, H), labels, old, adv, mask) -> PPO loss}``."""

    def matmul_eager(hidden, weight, labels, old, adv, mask):
        return _ppo(baselines.logprobs((hidden @ weight.T).flatten(0, 1), labels.flatten()).view(labels.shape),
                    old, adv, mask)

    providers = {"matmul+eager": matmul_eager}
    if hasattr(apa_fast, "linear_ppo_loss"):
        providers["apa_fast"] = lambda h, w, labels, old, adv, mask: apa_fast.linear_ppo_loss(
            h, w, labels, old, adv, mask, clip_eps=CLIP_EPS)
    if peers.installed("liger_kernel"):
        providers["liger"] = lambda h, w, labels, old, adv, mask: peers.liger_ppo_loss(
            h, w, labels, old, adv, mask, clip_eps=CLIP_EPS)
    if peers.installed("cut_cross_entropy"):
        providers["cce"] = lambda h, w, labels, old, adv, mask: _ppo(peers.cce_logprobs(h, w, labels), old, adv,
                                                                      mask)
    return providers


def linear_rows(dtype, generator, batch=(4, 128), hidden_size=256, vocab=32000) -> list[tuple]:
    hidden = torch.randn(*batch, hidden_size, generator=generator).to(dtype)
    weight = (2 * torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, batch, generator=generator)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want_logp = _oracle_logprobs(h64 @ w64.T, labels)
    old, adv, mask = _token_data(batch, want_logp, generator)
    want = torch.cat([g.flatten() for g in torch.autograd.grad(_ppo(want_logp, old.double(), adv.double(), mask),
                                                               (h64, w64))])
    rows = []
    for name, run in linear_providers().items():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        try:
            grads = torch.autograd.grad(run(h, w, labels, old, adv, mask), (h, w))
        except Exception as exc:  # a peer's API or CPU support changed: say so in the table
            rows.append((name, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
            continue
        rows.append((name, _relative_l2(torch.cat([g.flatten() for g in grads]), want), None))
    return rows


# ----------------------------------------------------------------------------------------------------
# GAE.
# ----------------------------------------------------------------------------------------------------
def _gae64(rewards, values, mask):
    """Float64 GAE from the definition; masked positions are skipped (neither a step nor a bootstrap)."""
    rewards, values = rewards.double(), values.double()
    advantages = torch.zeros_like(rewards)
    next_advantage, next_value = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        here = rewards[:, t] + GAMMA * next_value - values[:, t] + GAMMA * LAM * next_advantage
        advantages[:, t] = torch.where(mask[:, t], here, 0.0)
        next_advantage = torch.where(mask[:, t], here, next_advantage)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
    return advantages


def gae_rows(generator, rows=64, cols=512) -> list[tuple]:
    rewards = torch.randn(rows, cols, generator=generator) + 0.5
    values = torch.rand(rows, cols, generator=generator) + 0.25
    lengths = torch.randint(cols // 2, cols + 1, (rows, 1), generator=generator)
    layouts = {"right padding": torch.arange(cols) < lengths,
               "holes": torch.rand(rows, cols, generator=generator) < 0.7}
    # The peers take a float 0/1 mask, as their trainers build it.
    providers = {"apa_fast": (apa_fast.gae, torch.bool),
                 **{name: (fn, torch.float32) for name, fn in peers.GAE.items()}}
    table = []
    for name, (run, mask_type) in providers.items():
        errors = []
        for mask in layouts.values():
            advantages, _ = run(rewards, values, mask.to(mask_type), gamma=GAMMA, lam=LAM)
            errors.append((advantages.double() - _gae64(rewards, values, mask))[mask].abs().max().item())
        table.append((name, *errors))
    return table, list(layouts)


# ----------------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------------
def _e(value) -> str:
    return "—" if value is None else f"{value:.2g}"


def report(seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    date = datetime.date.today().isoformat()
    lines = [
        "# Accuracy of every provider against float64",
        "",
        f"`python -m benchmarks.accuracy` on {date}, torch {torch.__version__}, CPU (apa_fast: its torch backend), "
        f"seed {seed}. Peers: " + ", ".join(f"{name} {peers.VERSIONS.get(name, '')}".strip()
                                             for name in [*peers.logprob_providers(), "liger", "cce"]) +
        " (verl and OpenRLHF reimplemented from their wheels: `benchmarks/peers.py`). See the module's docstring "
        "for the inputs.",
        "",
        "## From logits: (4, 256, 32,000)",
        "",
        "| provider | logits | log-prob dtype | max abs error of log-probs | clipped-PPO d/dlogits, rel. L2 |",
        "|---|---|---|---:|---:|",
    ]
    for short, dtype in DTYPES.items():
        for name, logp_error, grad_error, logp_dtype in logits_rows(dtype, generator):
            lines.append(f"| {name} | {short} | {logp_dtype} | {_e(logp_error)} | {_e(grad_error)} |")
    lines += ["", "## From hidden states: hidden (4, 128, 256), weight (32,000, 256)", "",
              "| provider | dtype | clipped-PPO d/d(hidden, weight), rel. L2 | note |", "|---|---|---:|---|"]
    for short, dtype in DTYPES.items():
        for name, error, note in linear_rows(dtype, generator):
            lines.append(f"| {name} | {short} | {_e(error)} | {note or ''} |")
    table, layouts = gae_rows(generator)
    lines += ["", "## GAE: float32, 64 x 512, gamma 1, lam 0.95", "",
              "| provider | " + " | ".join(f"max abs error, {layout}" for layout in layouts) + " |",
              "|---|" + "---:|" * len(layouts)]
    lines += [f"| {name} | " + " | ".join(_e(error) for error in errors) + " |" for name, *errors in table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR / "accuracy-providers-cpu.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    text = report(args.seed)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

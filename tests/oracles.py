"""Float64 oracles and random inputs shared by the tests of every op (and by the GPU tests and reports): the
logits ops, GAE.

Tolerances (relative L2 error against float64 on the same inputs, see `TOLERANCES`):
- values are computed with float32 accumulation whatever the logits' dtype: 2e-5 for every dtype;
- gradients are written in the logits' dtype: float32 2e-5; bfloat16 8e-3 (its 8-bit mantissa rounds each
  element by up to 2**-9 relative); float16 1e-3 (11-bit mantissa).
"""

import torch
from conftest import assert_close_rel

import apa_fast
from apa_fast.kinds import BY_NAME
from apa_fast.kinds import KINDS as LOSS_KINDS

KINDS = [kind.name for kind in LOSS_KINDS]
TOLERANCES = {  # dtype: (value tolerance, gradient tolerance)
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 8e-3),
    torch.float16: (2e-5, 1e-3),
}
IGNORE = -100


# ----------------------------------------------------------------------------------------------------
# The float64 oracle of the logits ops.
# ----------------------------------------------------------------------------------------------------
def per_token64(tensor, rows_shape):
    """float64 ``tensor`` broadcast to the token shape from its leading dimensions ((B,) -> (B, T))."""
    tensor = tensor.double()
    return tensor.reshape(tuple(tensor.shape) + (1,) * (len(rows_shape) - tensor.dim())).expand(rows_shape)


def entropy64(scaled):
    """``-sum_v p_v log p_v`` of ``softmax(scaled)`` over the last dimension, straight from the definition; a -inf
    column adds nothing (its log-prob is replaced before the product, so autograd sees no 0 * -inf either)."""
    logp = torch.log_softmax(scaled, -1)
    return -(logp.exp() * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)


def oracle(kind, logits, labels, aux, adv, mask, *, lam=1.0, clip_eps=0.2, max_weight=20.0, temperature=1.0,
           reduction="mean", weights=None, normalizer=None, logp_rel_shift=0.0, entropy_coef=0.0,
           entropy_weights=None, with_entropy=False):
    """(value, dlogits) in float64: autograd through the registry's textbook formula (`LossKind.reference`),
    never through the kernels' hand-written derivatives. ``weights`` turn a per-token output into a scalar.
    ``logp_rel_shift`` perturbs every log-prob by that relative amount (see `float32_floor`).

    Entropy (`entropy64` of ``logits / temperature``, 0 where not counted): ``entropy_coef`` subtracts
    ``entropy_coef * H`` from every token's loss; ``entropy_weights`` add ``sum(entropy_weights * H)`` to the
    differentiated scalar (a differentiable entropy output); ``with_entropy`` returns (value, entropy, dlogits)."""
    x = logits.detach().double().requires_grad_()
    counted = labels.long() != IGNORE
    if mask is not None:
        counted = counted & (mask != 0)
    scaled = x / temperature
    lse = scaled.exp().sum(-1).log() if scaled.abs().max() < 300 else torch.logsumexp(scaled, -1)
    target = scaled.gather(-1, torch.where(counted, labels.long(), 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(counted, target - lse, 0.0) * (1.0 + logp_rel_shift)
    spec = BY_NAME[kind]
    hyper = {name: {"lam": lam, "clip_eps": clip_eps, "max_weight": max_weight}[name] for name in spec.hyper}
    aux64 = None if spec.aux is None else per_token64(aux, logp.shape)
    adv64 = per_token64(adv, logp.shape) if spec.reads_advantages else None
    per_token = spec.reference(logp, aux64, adv64, **hyper)
    entropy = torch.where(counted, entropy64(scaled), 0.0)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    per_token = torch.where(counted, per_token, 0.0)
    if kind == "logprobs" or reduction == "none":
        out = per_token
    elif reduction == "sum":
        out = per_token.sum()
    else:
        out = per_token.sum() / (counted.sum().clamp(min=1) if normalizer is None else normalizer)
    scalar = out if out.dim() == 0 else (out * weights.double()).sum()
    if entropy_weights is not None:
        scalar = scalar + (entropy * entropy_weights.double()).sum()
    scalar.backward()
    return (out.detach(), entropy.detach(), x.grad) if with_entropy else (out.detach(), x.grad)


def run_fused(kind, backend, logits, labels, aux, adv, mask, *, lam=1.0, temperature=1.0, reduction="mean",
              weights=None, inplace_backward=False, normalizer=None):
    """(value, dlogits) of the library op."""
    x = logits.detach().clone().requires_grad_()
    common = dict(temperature=temperature, ignore_index=IGNORE, backend=backend)
    if kind == "logprobs":
        out = apa_fast.logprobs(x, labels, **common)
    else:
        common.update(reduction=reduction, inplace_backward=inplace_backward, normalizer=normalizer)
        if kind == "apa":
            out = apa_fast.loss(x, labels, aux, adv, mask, lam=lam, **common)
        elif kind == "ppo":
            out = apa_fast.ppo_loss(x, labels, aux, adv, mask, **common)
        else:
            out = apa_fast.awr_loss(x, labels, adv, mask, lam=lam, **common)
    scalar = out if out.dim() == 0 else (out * weights).sum()
    scalar.backward()
    return out.detach(), x.grad


def make_token_data(rows_shape, vocab, *, ignore_frac=0.15, mask_frac=0.25):
    """Labels with some ignore_index, per-token data, a mask with holes, random output weights."""
    labels = torch.randint(0, vocab, rows_shape)
    labels[torch.rand(rows_shape) < ignore_frac] = IGNORE
    mask = torch.rand(rows_shape) >= mask_frac
    # aux: near the log-probs so that PPO ratios fall on both sides of the clip range.
    aux = -torch.rand(rows_shape) * 2 - torch.log(torch.tensor(float(vocab)))
    adv = torch.randn(rows_shape)
    weights = torch.randn(rows_shape)
    return labels, aux, adv, mask, weights


def make_inputs(rows_shape, vocab, *, dtype=torch.float32, scale=3.0, ignore_frac=0.15, mask_frac=0.25):
    """Random logits (never zeros) and the token data of `make_token_data`."""
    logits = (torch.randn(*rows_shape, vocab) * scale).to(dtype)
    return logits, *make_token_data(rows_shape, vocab, ignore_frac=ignore_frac, mask_frac=mask_frac)


# One float32 rounding of a log-prob, relative (2**-24), times a few roundings on the way (lse, target, difference).
LOGP_ROUNDING = 4 * 2.0**-24


def float32_floor(kind, logits, labels, aux, adv, mask, want_value, want_grad, **kwargs):
    """(value, gradient) error norms that no float32 computation of the log-probs can avoid: the change of the
    float64 answer when every log-prob moves by a few float32 roundings. Where a term nearly cancels (an APA
    residual ``logp - ref - A / lam`` of 1e-3 at ``logp`` of -8), this floor is above ``tol * |expected|``;
    elsewhere it is far below and changes nothing."""
    floors = []
    for shift in (LOGP_ROUNDING, -LOGP_ROUNDING):
        value, grad = oracle(kind, logits, labels, aux, adv, mask, logp_rel_shift=shift, **kwargs)
        floors.append(((value - want_value).norm().item(), (grad - want_grad).norm().item()))
    return max(f[0] for f in floors), max(f[1] for f in floors)


def check(kind, backend, logits, labels, aux, adv, mask, weights, *, what, **kwargs):
    dtype = logits.dtype
    value_tol, grad_tol = TOLERANCES[dtype]
    ref_mask = None if kind == "logprobs" else mask
    want_value, want_grad = oracle(kind, logits, labels, aux, adv, ref_mask, weights=weights, **kwargs)
    floor_value, floor_grad = float32_floor(kind, logits, labels, aux, adv, ref_mask, want_value, want_grad,
                                            weights=weights, **kwargs)
    got_value, got_grad = run_fused(kind, backend, logits, labels, aux, adv, ref_mask, weights=weights, **kwargs)
    assert got_value.dtype == torch.float32
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape
    scale = 0.0
    if want_value.dim() == 0:
        # A reduced loss is a sum of terms that may cancel: compare relative to the same reduction of |terms|.
        terms, _ = oracle(kind, logits, labels, aux, adv, ref_mask, weights=weights, **{**kwargs, "reduction": "none"})
        scale = terms.abs().sum().item()
        if kwargs.get("reduction", "mean") == "mean":
            scale /= kwargs.get("normalizer") or max(int((terms != 0).sum()), 1)
    assert_close_rel(got_value, want_value, value_tol, f"{what} value", scale=max(scale, floor_value / value_tol))
    assert_close_rel(got_grad, want_grad, grad_tol, f"{what} grad", scale=floor_grad / grad_tol)
    return got_value, got_grad, want_value, want_grad


# ----------------------------------------------------------------------------------------------------
# GAE: the float64 per-timestep oracle and its inputs (test_gae.py, test_cuda_build.py).
# ----------------------------------------------------------------------------------------------------
def gae_oracle(rewards, values, mask=None, *, gamma, lam, whiten=False):
    """Float64 GAE on the CPU, one time step at a time over all rows, straight from the definition."""
    rewards, values = rewards.detach().double().cpu(), values.detach().double().cpu()
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool().cpu()
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        here = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid[:, t], here, 0.0)
        next_advantage = torch.where(valid[:, t], here, next_advantage)
        next_value = torch.where(valid[:, t], values[:, t], next_value)
    returns = torch.where(valid, advantages + values, 0.0)
    if whiten:
        picked = advantages[valid]
        std = picked.std() if picked.numel() > 1 else torch.zeros((), dtype=torch.float64)
        advantages = torch.where(valid, (advantages - picked.mean()) / (std + 1e-8), 0.0)
    return advantages, returns


def gae_mask(layout, rows, cols):
    """A (rows, cols) bool mask, or None; every layout leaves at least one valid position per row but empty_rows."""
    if layout == "no_mask":
        return None
    lengths = torch.randint(1, cols + 1, (rows,))
    positions = torch.arange(cols)
    if layout == "right_padding":
        return positions < lengths[:, None]
    if layout == "left_padding":
        return positions >= (cols - lengths)[:, None]
    mask = torch.rand(rows, cols) < 0.6
    mask[:, torch.randint(0, cols, ())] = True
    if layout == "empty_rows":
        mask[::2] = False
    return mask


def gae_inputs(rows, cols, dtype=torch.float32, device="cpu"):
    """Rewards and values drawn away from zero (a zero input would hide a dropped term)."""
    rewards = torch.randn(rows, cols, dtype=torch.float64) + 0.5
    values = torch.rand(rows, cols, dtype=torch.float64) + 0.25
    return rewards.to(dtype=dtype, device=device), values.to(dtype=dtype, device=device)


def gae_tolerance(dtype, cols):
    # float32 accumulation over a recurrence up to `cols` long; measured 3e-8 to 1e-6 relative (20,000 steps
    # at gamma = lam = 1), so this leaves a margin of 5 to 10.
    return 1e-12 if dtype == torch.float64 else 1e-7 * max(cols, 16) ** 0.5


def gae_returns_scale(want_returns, values, mask, dtype, tol) -> float:
    """`assert_close_rel`'s ``scale`` for returns: ``returns = A + V`` adds the advantage, rounded once in the
    compute dtype, to the value, so an error of one rounding of ``|A|`` is unavoidable, and where A and V
    nearly cancel (a return of 1e-3 from A = -0.7, V = 0.7) it exceeds ``tol * |returns|``. Elsewhere the scale
    is below ``|returns|`` and changes nothing."""
    raw = want_returns - values.double().cpu()  # the unwhitened advantages, float64
    if mask is not None:
        raw = torch.where(mask.bool().cpu(), raw, 0.0)
    rounding = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    return 2 * rounding * raw.norm().item() / tol


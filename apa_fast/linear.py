"""The APA loss and token log-probs straight from hidden states: `apa_fast.linear_loss`, `linear_logprobs`.

The lm_head projection and the log-softmax run together, one chunk of token rows at a time, so at most one
chunk of logits exists: for GPT-J (V = 50,400) and 16k tokens that is a few hundred MB instead of 1.6 GB of
bf16 logits plus their gradient. Each chunk of logits goes through the same kernel family as `apa_fast.loss`
(the Triton kernels on CUDA, the chunked torch path on CPU) and its gradient is written over the chunk's
logits in place. Rows that do not count (ignored label or masked out, typically the prompt) are never
projected.

Logits as models compute them: ``z = logit_scale * (hidden @ weight.T + bias)``, then
``z = logit_softcap * tanh(z / logit_softcap)`` when set (Gemma-2's final soft-capping; Cohere's and
Granite's logit scales), then ``z / temperature`` inside the kernels. Precision follows ``F.linear``: under
``torch.autocast`` the projection runs in the autocast dtype; outside it, in the wider dtype of hidden and
weight (a bfloat16 hidden state with a float32 head, as in TRL's ``cast_lm_head_to_fp32``, projects in float32).

Gradients. For a scalar loss ("mean"/"sum") the upstream gradient is a single number, so the forward
computes the gradients of hidden, weight and bias while each chunk's logits are at hand (three matmuls in
all) and the backward only multiplies them by it. For per-token outputs (``reduction="none"``,
`linear_logprobs`) the backward recomputes each chunk's logits from the saved hidden states (four matmuls).
Both run the same sweep (`_sweep`). The weight gradient accumulates in float32 across chunks. The sweep runs
inside the custom ops ``apa_fast::linear_forward`` / ``apa_fast::linear_backward``, so `torch.compile` sees one
opaque op (no graph break).

Equivalent PyTorch code::

    logits = hidden @ weight.T + bias                  # (..., V)
    loss = apa_fast.loss(logits, labels, ref_logprobs, advantages, mask, lam=lam, ...)
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from . import zero3
from .kinds import APA, AWR, LOGPROB, PPO, LossKind
from .logprob import (
    autograd_function,
    device_guard,
    differentiable_once,
    entropy_options,
    implementation,
    once_differentiable_op,
    scaled,
    softmax_tangents,
    token_inputs,
    transformed,
)
from .rows import as_rows3d, reduce_rows, upstream_scale
from .validation import LOGIT_SCALE, LOGIT_SOFTCAP, Range, check_float_rows, check_integer, check_number

# The default chunk (`_chunk_rows`) weighs the chunk's memory against the weight gradient's accumulation.
# Every chunk reads and writes the float32 (V, H) weight gradient once: 8 bytes an element, 12 when the
# projection runs in 16 bits (the chunk's product is written, read, then added). Its three matmuls do
# 6 * rows * V * H flops. The accumulation takes at most ACCUMULATION_OVERHEAD of the matmuls' time when
# rows >= bytes * BALANCE / (6 * ACCUMULATION_OVERHEAD), BALANCE being the device's flops per DRAM byte
# (V and H cancel): a few-core x86 CPU does ~150 GFLOP/s fp32 on ~10 GB/s (16); an H100 989 TFLOP/s bf16 on
# 3.35 TB/s (300). That gives 128 rows on CPU and 2,432 on CUDA (bf16).
BALANCE = {"cpu": 16, "cuda": 300}
ACCUMULATION_OVERHEAD = 0.25
# Above that floor, a chunk is 1/MAX_ACCUMULATIONS of the counted rows: the weight gradient is accumulated at
# most this many times a step whatever the tokens, and one chunk's logits are 1/4 of the logits the naive
# path materialises (measured on CPU at 2,048 x H 1,024 x V 50,400 fp32, 1 in 8 tokens masked: peak 0.26 of the
# plain eager path, 0.80x its time, where chunks of 1/8 took 0.84x: a CPU matmul of 512 rows beats two of 256).
MAX_ACCUMULATIONS = 4
# Caps on one chunk's logits: a fraction of the free memory and a ceiling by device type, above the floor's
# rows for any V up to 256k (1 GiB is 1,048 float32 rows of 256k on CPU; 2 GiB 4,194 bf16 rows on CUDA).
MAX_CHUNK_BYTES = {"cpu": 2**30, "cuda": 2 * 2**30}
FREE_MEMORY_FRACTION = 8
# Chunks are a multiple of this many rows when they can be (tensor-core tiles).
ROW_MULTIPLE = 64
# chunk_size reaches the custom ops as an int64 and row indices as int64 tensors.
CHUNK_SIZE = Range(1, 2**63 - 1, "a number of token rows")


# ----------------------------------------------------------------------------------------------------
# Input checks and the projection's dtype; the per-token inputs are checked by apa_fast.validation.
# ----------------------------------------------------------------------------------------------------
def _check_projection(hidden, weight, bias) -> None:
    check_float_rows("hidden", hidden, "H")
    hidden_size = hidden.shape[-1]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if name == 'bias' else ''}, "
                            f"got {type(tensor).__name__}")
        zero3.check_gathered(name, tensor)
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
        check_float_rows(name, tensor, "V" if name == "bias" else "H")
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V, {hidden_size}) (V >= 1, hidden.shape[-1] = {hidden_size}), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (weight.shape[0]), got {tuple(bias.shape)}")


def _projection_dtype(hidden, weight, bias) -> torch.dtype:
    """The dtype the projection runs in: the autocast dtype under autocast, else the widest input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _chunk_rows(chunk_size, rows, hidden_size, vocab, dtype, device) -> int:
    """Rows per chunk for ``rows`` counted token rows: ``chunk_size`` when positive, else the model above.

    ``max(accumulation floor, ceil(rows / MAX_ACCUMULATIONS))`` rounded up to ``ROW_MULTIPLE``, then capped
    by the chunk's bytes (logits, float32 on CPU where the torch path upcasts, plus the gathered hidden row
    and its gradient) against ``MAX_CHUNK_BYTES`` and the free memory, and by ``rows``; at least 1.
    """
    if chunk_size > 0:
        return chunk_size
    itemsize = torch.finfo(dtype).bits // 8
    accumulated_bytes = 8 if itemsize == 4 else 12
    floor = math.ceil(accumulated_bytes * BALANCE.get(device.type, BALANCE["cuda"]) / (6 * ACCUMULATION_OVERHEAD))
    wanted = max(floor, -(-rows // MAX_ACCUMULATIONS))
    wanted = -(-wanted // ROW_MULTIPLE) * ROW_MULTIPLE
    logit_bytes = 4 if device.type == "cpu" else itemsize
    row_bytes = vocab * logit_bytes + 2 * hidden_size * itemsize
    budget = min(MAX_CHUNK_BYTES.get(device.type, MAX_CHUNK_BYTES["cuda"]), _free_bytes(device) // FREE_MEMORY_FRACTION)
    return max(1, min(wanted, budget // row_bytes, rows))


def _counted_chunks(labels: torch.Tensor, chunk_size: int, hidden: torch.Tensor, weight: torch.Tensor):
    """(int64 flat indices of the rows that count, rows per chunk) for a sweep over ``labels`` (int32 ``(rows,)``,
    -1 where the row does not count): one host sync, the chunk loop's length."""
    counted_rows = torch.nonzero(labels >= 0).squeeze(1)
    return counted_rows, _chunk_rows(chunk_size, counted_rows.numel(), hidden.shape[-1], weight.shape[0], hidden.dtype,
                                     hidden.device)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------
# The chunked sweep.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Projection:
    """``logit_scale * (hidden @ weight.T + bias)``, soft-capped, for selected token rows.

    ``hidden3d``: ``(outer, inner, H)`` view; ``softcap`` 0 means none.
    """

    hidden3d: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float

    def hidden_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, H)`` copy of the flat token rows ``rows`` (no copy of the whole, possibly strided, hidden)."""
        inner = self.hidden3d.shape[1]
        return self.hidden3d[rows // inner, rows % inner]

    def logits(self, hidden_rows: torch.Tensor,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z (n, V) contiguous in the projection dtype, tanh (n, V) float32 or None)``; tanh is kept for the
        chain rule through the soft cap. ``out``: a contiguous ``(n, V)`` buffer to write z into (else a new one)."""
        if self.bias is None:
            z = torch.mm(hidden_rows, self.weight.T, out=out)
        else:
            z = torch.addmm(self.bias, hidden_rows, self.weight.T, out=out)
        if self.scale != 1.0:
            z.mul_(self.scale)
        if not self.softcap:
            return z, None
        tanh = z.to(torch.float32, copy=True).div_(self.softcap).tanh_()
        z.copy_(tanh * self.softcap)
        return z, tanh

    def chain(self, dlogits: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
        """d/d(hidden @ weight.T + bias) from d/dz, in place: times ``scale * (1 - tanh^2)``."""
        if tanh is not None:
            dlogits.copy_(dlogits.float().mul_(1.0 - tanh.square()))
        return dlogits.mul_(self.scale) if self.scale != 1.0 else dlogits


@dataclasses.dataclass(frozen=True)
class _LogitsPass:
    """What every chunk of logits goes through: one implementation of the kernel family and one loss kind, with
    the entropy (and its coefficient in the loss) or without."""

    impl: object
    loss_kind: int
    inv_temperature: float
    param0: float
    param1: float
    entropy: bool = False
    entropy_coef: float = 0.0


@dataclasses.dataclass
class _Gradients:
    """Gradient buffers, None where the input needs none: hidden ``(rows, H)`` in the projection dtype; weight
    and bias accumulate in float32."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, proj: _Projection, rows: int, needed: tuple[bool, bool, bool]):
        hidden3d, weight, bias = proj.hidden3d, proj.weight, proj.bias
        return cls(
            hidden3d.new_zeros(rows, hidden3d.shape[-1]) if needed[0] else None,
            # Contiguous whatever the weight's strides: what the fake kernels promise a compiled graph.
            weight.new_zeros(weight.shape, dtype=torch.float32) if needed[1] else None,
            weight.new_zeros(weight.shape[:1], dtype=torch.float32) if needed[2] and bias is not None else None,
        )

    def accumulate(self, proj: _Projection, rows, hidden_rows, dlogits) -> None:
        """Add the contribution of ``dlogits (n, V)`` (d/d of the unscaled projection) for the flat ``rows``."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, dlogits @ proj.weight)
        if self.weight is not None:
            if dlogits.dtype == torch.float32:
                self.weight.addmm_(dlogits.T, hidden_rows)  # in place: no second (V, H) buffer
            else:
                # The chunk's product is rounded to the inputs' dtype (CPU matmuls have no float32 output
                # for bf16 inputs); the sum over chunks is float32.
                self.weight.add_(dlogits.T @ hidden_rows)
        if self.bias is not None:
            self.bias.add_(dlogits.sum(0, dtype=torch.float32))

    def outputs(self, proj: _Projection, hidden_shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradients in the projection dtype, shaped like their inputs; empty tensors where not needed."""
        return (proj.weight.new_empty(0) if self.hidden is None else self.hidden.view(hidden_shape),
                proj.weight.new_empty(0) if self.weight is None else self.weight.to(proj.weight.dtype),
                proj.weight.new_empty(0) if self.bias is None else self.bias.to(proj.weight.dtype))


def _sweep(proj, passes, labels, counted_rows, chunk_rows, *, aux=None, adv=None, row_scale=None, lse=None,
           row_grad=None, grads=None, entropy=None, entropy_grad=None):
    """One pass over ``counted_rows`` (int64, flat token indices), one chunk of logits at a time.

    Forward mode (``aux``/``adv`` given, float32 ``(rows,)``, empty when the epilogue ignores them): returns
    float32 ``(4, rows)`` = (logp, lse, loss, dlogp), and the entropy fifth with ``passes.entropy``, zero on rows
    that do not count; with ``grads`` it also accumulates the gradients of ``sum(row_scale * (loss -
    entropy_coef * entropy))`` (``row_scale`` a float32 0-dim tensor; the entropy term with ``passes.entropy``).
    Backward mode (``lse`` and ``row_grad``, float32 ``(rows,)``): accumulates into ``grads`` the gradients
    of ``sum(row_grad * logp + entropy_grad * entropy)`` (the entropy term when ``entropy``/``entropy_grad``,
    the forward's entropy and its upstream gradient, are given).
    """
    forward_mode = aux is not None
    impl = passes.impl
    kernel_args = dict(loss_kind=passes.loss_kind, inv_temperature=passes.inv_temperature, param0=passes.param0,
                       param1=passes.param1, entropy=passes.entropy)
    stats = (torch.zeros(4 + passes.entropy, labels.numel(), dtype=torch.float32, device=labels.device)
             if forward_mode else None)
    # One logits buffer for every chunk: a fresh chunk-sized allocation each time pays its page faults again on a
    # CPU (15 ms of a 190 ms chunk at 256 x 50,400 float32).
    buffer = None
    for start in range(0, counted_rows.numel(), chunk_rows):
        rows = counted_rows[start:start + chunk_rows]
        hidden_rows = proj.hidden_rows(rows)
        if buffer is None:
            buffer = hidden_rows.new_empty((rows.numel(), proj.weight.shape[0]))
        logits, tanh = proj.logits(hidden_rows, buffer[:rows.numel()])
        logits3d, chunk_labels = logits[None], labels[rows]
        # dlogits overwrite the chunk's logits: nothing reads them afterwards.
        if forward_mode:
            chunk_aux, chunk_adv = (aux[rows] if aux.numel() else aux), (adv[rows] if adv.numel() else adv)
            if grads is not None:
                chunk_stats = impl.forward_grad(logits3d, chunk_labels, chunk_aux, chunk_adv, logits3d, row_scale,
                                                entropy_coef=passes.entropy_coef, **kernel_args)
            else:
                chunk_stats = impl.forward(logits3d, chunk_labels, chunk_aux, chunk_adv, **kernel_args)
            stats[:, rows] = torch.stack(chunk_stats)
        else:
            entropy_args = {} if entropy_grad is None else {"entropy": entropy[rows].contiguous(),
                                                            "entropy_grad": entropy_grad[rows].contiguous()}
            impl.backward(logits3d, chunk_labels, lse[rows], row_grad[rows].contiguous(), logits3d,
                          inv_temperature=passes.inv_temperature, **entropy_args)
        if grads is not None:
            grads.accumulate(proj, rows, hidden_rows, proj.chain(logits, tanh))
    return stats


# ----------------------------------------------------------------------------------------------------
# Custom ops and their autograd formulas.
# ----------------------------------------------------------------------------------------------------
def _setup(hidden, weight, bias, logit_scale, logit_softcap, backend, loss_kind=0, inv_temperature=1.0, param0=0.0,
           param1=0.0, entropy=False, entropy_coef=0.0):
    proj = _Projection(as_rows3d(hidden), weight, bias, logit_scale, logit_softcap)
    return proj, _LogitsPass(implementation(backend), loss_kind, inv_temperature, param0, param1, entropy,
                             entropy_coef)


@torch.library.custom_op("apa_fast::linear_forward", mutates_args=())
def _linear_forward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    aux: torch.Tensor, adv: torch.Tensor, denom: torch.Tensor | None, kind: int, inv_temperature: float,
    param0: float, param1: float, logit_scale: float, logit_softcap: float, reduction: str, chunk_size: int,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool, entropy_coef: float = 0.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, stats, grad_hidden, grad_weight, grad_bias, entropy); stats: float32 ``(2, rows)`` lse and dlogp.
    The gradients (of the output, for an upstream gradient of 1) are computed here for scalar reductions and
    returned empty otherwise. With ``entropy``: ``entropy`` is the float32 ``(rows,)`` entropy (else empty) and
    the output is the kind's loss minus ``entropy_coef`` times the entropy, per token or under the reduction."""
    proj, passes = _setup(hidden, weight, bias, logit_scale, logit_softcap, backend, kind, inv_temperature, param0,
                          param1, entropy, entropy_coef)
    needed = (need_hidden, need_weight, need_bias)
    with device_guard(hidden.device), torch.autocast(hidden.device.type, enabled=False):
        counted_rows, chunk_rows = _counted_chunks(labels, chunk_size, hidden, weight)
        grads = _Gradients.zeros(proj, labels.numel(), needed) if reduction != "none" and any(needed) else None
        row_scale = upstream_scale(reduction, torch.ones((), device=hidden.device), denom)
        _, lse, loss, dlogp, *entropy_rows = _sweep(proj, passes, labels, counted_rows, chunk_rows, aux=aux, adv=adv,
                                                    row_scale=row_scale, grads=grads)
        if entropy:
            loss = loss - entropy_coef * entropy_rows[0]
        # A copy: the per-token output must not share memory with the other outputs (custom-op contract).
        output = reduce_rows(reduction, loss.clone(), denom, hidden.shape[:-1])  # for log-probs, loss is logp
        grad_outputs = (grads or _Gradients(None, None, None)).outputs(proj, hidden.shape)
    entropy_out = entropy_rows[0].clone() if entropy else lse.new_empty(0)
    return output, torch.stack([lse, dlogp]), *grad_outputs, entropy_out


@_linear_forward_op.register_fake
def _(hidden, weight, bias, labels, aux, adv, denom, kind, inv_temperature, param0, param1, logit_scale,
      logit_softcap, reduction, chunk_size, backend, need_hidden, need_weight, need_bias, entropy_coef=0.0,
      entropy=False):
    stats = labels.new_empty((2, labels.shape[0]), dtype=torch.float32)
    output = stats.new_empty(hidden.shape[:-1] if reduction == "none" else ())
    now = reduction != "none"
    return (output, stats,
            hidden.new_empty(hidden.shape if now and need_hidden else (0,)),
            weight.new_empty(weight.shape if now and need_weight else (0,)),
            weight.new_empty(weight.shape[:1] if now and need_bias else (0,)),
            stats.new_empty((labels.shape[0] if entropy else 0,)))


@torch.library.custom_op("apa_fast::linear_backward", mutates_args=())
def _linear_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, lse: torch.Tensor,
    row_grad: torch.Tensor, inv_temperature: float, logit_scale: float, logit_softcap: float, chunk_size: int,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool, entropy: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(row_grad * logp + entropy_grad * entropy)`` (the entropy term when both are given) with
    respect to hidden, weight, bias (empty where not needed)."""
    proj, passes = _setup(hidden, weight, bias, logit_scale, logit_softcap, backend, inv_temperature=inv_temperature)
    with device_guard(hidden.device), torch.autocast(hidden.device.type, enabled=False):
        counted_rows, chunk_rows = _counted_chunks(labels, chunk_size, hidden, weight)
        grads = _Gradients.zeros(proj, labels.numel(), (need_hidden, need_weight, need_bias))
        _sweep(proj, passes, labels, counted_rows, chunk_rows, lse=lse, row_grad=row_grad, grads=grads,
               entropy=entropy, entropy_grad=entropy_grad)
        return grads.outputs(proj, hidden.shape)


@_linear_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, row_grad, inv_temperature, logit_scale, logit_softcap, chunk_size, backend,
      need_hidden, need_weight, need_bias, entropy=None, entropy_grad=None):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[:1] if need_bias else (0,)))


def _setup_linear(ctx, inputs, output):
    (hidden, weight, bias, labels, _, _, denom, _, inv_temperature, _, _, logit_scale, logit_softcap, reduction,
     chunk_size, backend, need_hidden, need_weight, need_bias, *entropy_inputs) = inputs
    _, stats, *grads, entropy = output
    # Only the loss (and, per token, the entropy) is differentiated: no (V, H) zeros materialised for the gradient
    # outputs in the backward.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(stats, *grads, *([entropy] if reduction != "none" else []))
    ctx.needed, ctx.reduction = (need_hidden, need_weight, need_bias), reduction
    ctx.config = (inv_temperature, logit_scale, logit_softcap, chunk_size, backend)
    ctx.entropy_coef = entropy_inputs[0] if entropy_inputs else 0.0
    ctx.has_denom = denom is not None
    ctx.num_inputs = len(inputs)  # the custom op sees its defaults, the autograd.Function only what was passed
    if reduction != "none":
        ctx.save_for_backward(*grads)
    else:
        # The entropy (empty when off) is saved for its gradient term.
        ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
        ctx.save_for_forward(hidden, weight, bias, labels, stats, entropy)


def _linear_backward(ctx, grad_output, *unused):
    if ctx.reduction != "none":
        grads = tuple(differentiable_once(scaled(g, grad_output)) for g in ctx.saved_tensors)
    else:
        hidden, weight, bias, labels, (lse, dlogp), entropy = ctx.saved_tensors
        # Upstream gradients may be None (set_materialize_grads(False)): an output the objective does not use.
        grad_output = torch.zeros_like(lse) if grad_output is None else grad_output.reshape(-1).float()
        entropy_args = ()
        if entropy.numel():
            # The output is loss - entropy_coef * H per token: H gets -entropy_coef times its upstream gradient,
            # plus the entropy output's own.
            grad_entropy = unused[-1]
            entropy_grad = -ctx.entropy_coef * grad_output
            entropy_grad = entropy_grad if grad_entropy is None else entropy_grad + grad_entropy.reshape(-1).float()
            entropy_args = (entropy, torch.where(labels >= 0, entropy_grad, 0.0))
        grads = _linear_grads(hidden, weight, bias, labels, lse, dlogp * grad_output, *ctx.config, *ctx.needed,
                              *entropy_args)
    grad_hidden, grad_weight, grad_bias = (g if need else None for g, need in zip(grads, ctx.needed, strict=True))
    return grad_hidden, grad_weight, grad_bias, *([None] * (ctx.num_inputs - 3))


def _linear_jvp(ctx, hidden_tangent, weight_tangent, bias_tangent, *_):
    """Tangent of the per-token output (forward mode runs the linear ops per token: `transformed`) for
    the tangents of hidden, weight and bias: each chunk's logits are projected again, their tangent ``dz`` taken
    through the projection, scale and soft cap, and `softmax_tangents` does the rest. The other inputs' tangents are
    not propagated, as their gradients are not."""
    hidden, weight, bias, labels, (lse, dlogp), entropy = ctx.saved_tensors
    inv_temperature, logit_scale, logit_softcap, chunk_size, _ = ctx.config
    proj = _Projection(as_rows3d(hidden), weight, bias, logit_scale, logit_softcap)
    counted_rows, chunk_rows = _counted_chunks(labels, chunk_size, hidden, weight)
    hidden_rows_tangent = None if hidden_tangent is None else hidden_tangent.reshape(-1, hidden.shape[-1])
    parts, entropy_parts = [lse[:0]], [lse[:0]]
    with device_guard(hidden.device), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, counted_rows.numel(), chunk_rows):
            rows = counted_rows[start:start + chunk_rows]
            hidden_rows = proj.hidden_rows(rows)
            logits, tanh = proj.logits(hidden_rows)
            dz = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            if hidden_rows_tangent is not None:
                dz = dz + hidden_rows_tangent[rows] @ weight.T
            if weight_tangent is not None:
                dz = dz + hidden_rows @ weight_tangent.T
            if bias_tangent is not None:
                dz = dz + bias_tangent
            dz = dz * logit_scale if tanh is None else dz * logit_scale * (1.0 - tanh.square())
            chunk_logp_dt, chunk_entropy_dt = softmax_tangents(logits, dz, labels[rows], lse[rows], inv_temperature,
                                                               entropy[rows] if entropy.numel() else None)
            parts.append(chunk_logp_dt)
            if chunk_entropy_dt is not None:
                entropy_parts.append(chunk_entropy_dt)
    dlogp_dt = torch.zeros_like(lse).index_add(0, counted_rows, torch.cat(parts))
    output_tangent = dlogp * dlogp_dt
    entropy_dt = torch.zeros_like(entropy)  # empty when off: a differentiable output needs a tangent, not None
    if entropy.numel():
        entropy_dt = torch.zeros_like(lse).index_add(0, counted_rows, torch.cat(entropy_parts))
        output_tangent = output_tangent - ctx.entropy_coef * entropy_dt
    # The other outputs are not differentiable.
    return output_tangent.reshape(hidden.shape[:-1]), None, None, None, None, entropy_dt


_linear_forward = autograd_function(_linear_forward_op, _linear_backward, _setup_linear, _linear_jvp)
_linear_grads = once_differentiable_op(_linear_backward_op)


# ----------------------------------------------------------------------------------------------------
# Validation and dispatch.
# ----------------------------------------------------------------------------------------------------
def _fused_linear(kind: LossKind, hidden, weight, bias, labels, aux, adv, mask, *, temperature, ignore_index,
                  reduction, chunk_size, backend, logit_scale, logit_softcap, hyper=None, normalizer=None,
                  entropy_coef=0.0, return_entropy=False):
    """Validate, cast as F.linear would, dispatch, run. ``aux``/``adv`` are None when ``kind`` reads none."""
    _check_projection(hidden, weight, bias)
    entropy_coef, return_entropy, entropy = entropy_options(entropy_coef, return_entropy)
    logit_scale = check_number("logit_scale", logit_scale, LOGIT_SCALE)
    if logit_softcap is not None:
        logit_softcap = check_number("logit_softcap", logit_softcap, LOGIT_SOFTCAP)
    if chunk_size is not None:
        chunk_size = check_integer("chunk_size", chunk_size, CHUNK_SIZE)
    t = token_inputs(kind, labels, aux, adv, mask, rows_shape=hidden.shape[:-1], vocab=weight.shape[0],
                     device=hidden.device, anchor="hidden", temperature=temperature, ignore_index=ignore_index,
                     reduction=reduction, normalizer=normalizer, hyper=hyper or {}, backend=backend)

    # The casts are autograd ops: the gradients come back in each input's own dtype.
    dtype = _projection_dtype(hidden, weight, bias)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    grad_on = torch.is_grad_enabled()
    needed = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    # Under forward-mode AD and torch.func, per token (derivatives from saved inputs) and reduced outside the op.
    reduction = "none" if transformed(hidden, weight, bias) else t.reduction
    output, *_, entropy_rows = _linear_forward(hidden, weight, bias, t.labels, t.aux, t.adv, t.denom, kind.id,
                                               t.inv_temperature, t.param0, t.param1, float(logit_scale),
                                               float(logit_softcap or 0.0), reduction, chunk_size or 0, t.backend,
                                               *needed, entropy_coef, entropy)
    if reduction != t.reduction:
        output = reduce_rows(t.reduction, output.reshape(-1), t.denom, ())
    if not return_entropy:
        return output
    # Differentiable for log-probs; for the losses a detached copy, as from the logits ops.
    entropy_rows = entropy_rows.reshape(hidden.shape[:-1])
    return output, (entropy_rows if kind is LOGPROB else entropy_rows.detach())


# ----------------------------------------------------------------------------------------------------
# Public functionals.
# ----------------------------------------------------------------------------------------------------
_COMMON_DOC = """
    Shapes and dtypes: ``hidden (..., H)`` float32/bfloat16/float16, any strides (the final hidden states,
    aligned with ``labels``: position i scores ``labels[i]``); ``weight (V, H)`` the lm_head weight and
    ``bias (V,)`` (optional), on hidden's device; ``labels (...)``, per-token float tensors and ``mask`` as for
    `apa_fast.loss` (broadcast from the leading dimensions allowed). The logits are ``z = logit_scale *
    (hidden @ weight.T + bias)``, soft-capped as ``logit_softcap * tanh(z / logit_softcap)`` when
    ``logit_softcap`` is set, then divided by ``temperature``. The projection runs in the autocast dtype under
    ``torch.autocast``, else in the widest dtype of hidden, weight and bias. The result is float32. Gradients
    flow to ``hidden``, ``weight`` and ``bias`` in their own dtypes. ``chunk_size``: token rows projected at a
    time, an int >= 1 (default: from H, V and the free memory). ``logit_scale`` and ``logit_softcap`` in
    [1e-6, 1e6]; the other numbers and ``backend`` as for `apa_fast.loss`. Under DeepSpeed ZeRO-3
    call it (forward and backward) inside ``apa_fast.zero3.gathered(weight, bias, model=engine.module)``.
    Losses: ``entropy_coef`` and ``return_entropy`` as for `apa_fast.loss` (the entropy of
    ``softmax(z / temperature)``, z after ``logit_scale`` and ``logit_softcap``)."""


def linear_loss(hidden, weight, labels, ref_logprobs, advantages, mask=None, *, bias=None, lam=1.0,
                temperature=1.0, logit_scale=1.0, logit_softcap=None, ignore_index=-100, reduction="mean",
                normalizer=None, chunk_size=None, backend="auto", entropy_coef=0.0, return_entropy=False):
    """APA loss from hidden states: `apa_fast.loss` of the projected logits without the logits tensor.

    Mean over counted tokens (or the sum over ``normalizer``) of ``(logp - ref_logprobs - advantages / lam) ** 2``.
    """
    return _fused_linear(APA, hidden, weight, bias, labels, ref_logprobs, advantages, mask, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
                         logit_scale=logit_scale, logit_softcap=logit_softcap, hyper={"lam": lam},
                         normalizer=normalizer, entropy_coef=entropy_coef, return_entropy=return_entropy)


def linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask=None, *, bias=None, clip_eps=0.2,
                    temperature=1.0, logit_scale=1.0, logit_softcap=None, ignore_index=-100, reduction="mean",
                    normalizer=None, chunk_size=None, backend="auto", entropy_coef=0.0, return_entropy=False):
    """PPO's clipped surrogate from hidden states: `apa_fast.ppo_loss` of the projected logits."""
    return _fused_linear(PPO, hidden, weight, bias, labels, old_logprobs, advantages, mask, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
                         logit_scale=logit_scale, logit_softcap=logit_softcap, hyper={"clip_eps": clip_eps},
                         normalizer=normalizer, entropy_coef=entropy_coef, return_entropy=return_entropy)


def linear_awr_loss(hidden, weight, labels, advantages, mask=None, *, bias=None, lam=1.0, max_weight=20.0,
                    temperature=1.0, logit_scale=1.0, logit_softcap=None, ignore_index=-100, reduction="mean",
                    normalizer=None, chunk_size=None, backend="auto", entropy_coef=0.0, return_entropy=False):
    """AWR from hidden states: `apa_fast.awr_loss` of the projected logits."""
    return _fused_linear(AWR, hidden, weight, bias, labels, None, advantages, mask, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size, backend=backend,
                         logit_scale=logit_scale, logit_softcap=logit_softcap,
                         hyper={"lam": lam, "max_weight": max_weight}, normalizer=normalizer,
                         entropy_coef=entropy_coef, return_entropy=return_entropy)


def linear_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, logit_scale=1.0, logit_softcap=None,
                    ignore_index=-100, chunk_size=None, backend="auto", return_entropy=False):
    """float32 ``(...)`` ``log_softmax(logits / temperature)[label]`` of the projected logits, 0 where ignored.

    ``return_entropy=True``: ``(logp, entropy)``, the float32 ``(...)`` entropy of ``softmax(z / temperature)``
    (0 where ignored) from the same pass, differentiable too.
    """
    return _fused_linear(LOGPROB, hidden, weight, bias, labels, None, None, None, temperature=temperature,
                         ignore_index=ignore_index, reduction="none", chunk_size=chunk_size, backend=backend,
                         logit_scale=logit_scale, logit_softcap=logit_softcap, return_entropy=return_entropy)


for _fn in (linear_loss, linear_ppo_loss, linear_awr_loss, linear_logprobs):
    _fn.__doc__ += _COMMON_DOC

"""Triton kernels for token log-probabilities and the policy losses built on them (APA, PPO, AWR...).

One kernel family, one loss epilogue (`_loss_epilogue`, selected by the ``LOSS`` constexpr, whose ids come
from `apa_fast.kinds.KINDS`), three passes:

* ``_logprob_fwd_kernel`` (pass "forward"): one program per token row. A single pass over the vocabulary in
  blocks keeps a running log-sum-exp in float32 (whatever the logits' dtype) per group of adjacent columns
  held by one thread, and reduces across threads once, after the loop (`_row_logsumexp2`); it gathers the
  sampled token's logit and runs the epilogue. It writes four float32 numbers
  per row: the log-prob, the log-sum-exp, the per-token loss and ``d loss / d logp``. Nothing of size
  ``[rows x vocab]`` is written.
* ``_logprob_bwd_kernel`` (pass "backward"): one program per row reads the row once, rebuilds the softmax from
  the saved log-sum-exp and writes ``dlogits = g_row * (onehot(label) - softmax) / temperature`` in the logits'
  dtype, optionally into the logits buffer itself (the gradient loop `_row_gradient`, shared with
  "forward_grad").
* ``_logprob_fwd_grad_kernel`` (pass "forward_grad", training mode): the forward's row pass, then, in the
  same program, a second pass over the row that re-reads it (from L2: a persistent grid keeps few rows in
  flight, see `grad_programs`) and writes ``dlogits`` for a known upstream scale. DRAM traffic: the logits
  read once and the gradient written once, instead of the logits read twice by the two-kernel path.

Full-width accesses at every V: each row's loop runs over its body, the columns from its first 16-byte boundary
in whole 16-byte vectors (`_row_parts`; the start hinted aligned, the mask constant over each vector), so that
its loads and stores are 128-bit whatever V and wherever the row starts (a row of odd V in a contiguous
``(N, V)`` tensor starts at another offset from a boundary than the row before it). The head before that
boundary and the tail after the last whole vector, fewer than 8 bf16 columns each, are one small tile after the
loop (`_row_edges`). The stores are vectors where the gradient rows start at the logits rows' offsets (in place,
or the ops' `apa_fast.rows.gradient_buffer`), else scalar (`_grad_vector`).

Row addressing: the leading dimensions of ``logits (..., V)`` are collapsed by the host into at most two
(outer, inner) with their own strides, so slices such as ``logits[:, :-1]`` need no copy. A row whose
label is negative does not count (the host folds ``ignore_index`` and the mask into that): its outputs
and gradient coefficient are 0, its logits are never read, and its gradient row is exact zeros.

Non-finite logits: ``-inf`` anywhere (masked vocabularies, whole -inf blocks or lanes) gives the torch
backend's answer. The running maximum starts at the most negative finite float instead of ``-inf``, so the
online update never forms ``-inf - -inf``; padded lanes load ``-inf`` and are scaled by ``1/T > 0`` (the host
accepts T in [1e-6, 1e6]), so they never form ``-inf * 0``.

Exponentials are base 2 (``exp2(x * log2(e) / T)``): one multiply folded into the scale, and the ``ex2``
instruction the hardware has.

Entropy (the ``ENTROPY`` constexpr; off, the kernels compile to the code without it): the row pass keeps a third
running accumulator per group beside ``m`` and ``s``, ``t = sum 2^(y - m) * (y - m)`` (``y = x * scale2``,
rescaled with ``s`` when ``m`` moves), so that ``H = ln 2 * (log2 S - T / S)`` with ``S``, ``T`` relative to the
row maximum: no cancellation of two log-sum-exp sized numbers. Every ``y - m`` that multiplies an exponential is
clamped at -256 (``exp2`` of anything below is 0 in float32), so a -inf column adds ``0 * -256 = 0``, never
``0 * -inf``. The gradient passes add ``-g_H * p * (ln p + H)`` per column (``g_H`` the upstream gradient of H)
in the same loop: the same loads and stores, two more instructions per logit.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..kinds import APA, AWR, KINDS, LOGPROB, PPO
from ..rows import gradient_buffer

# Epilogue selectors (the LOSS constexpr): the registry's ids. Kernels may read module globals only when
# they are constexpr.
_LOGPROB, _APA, _PPO, _AWR = (tl.constexpr(kind.id) for kind in (LOGPROB, APA, PPO, AWR))
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Where the running maximum starts: finite, so that exp2(running_max - new_max) is never exp2(-inf - -inf).
_MOST_NEGATIVE = tl.constexpr(-3.4028234663852886e38)
# Entropy: exponents that multiply their own exponential are clamped here (exp2 of anything below is 0 in float32).
_EXP2_FLOOR = tl.constexpr(-256.0)

# Block caps. The forward and backward stream and keep 16 elements per thread (two 128-bit loads in bf16,
# four in float32). The forward-with-gradient kernel uses larger blocks with up to 32 warps, and a persistent
# grid (`grad_programs`) bounds the rows in flight so that its second pass over each row hits L2.
MAX_BLOCK_V = 4096
MAX_GRAD_BLOCK_V = 16384
# The byte model of training mode (benchmarks/README.md, "Training mode sized by the byte model"): a row is
# re-read from L2 only if the rows in flight (one per program of the persistent grid) fit in this share of the
# L2; the rest holds the gradient lines on their way out (evict-first) and everything else. H100 (50 MB): 25 MB,
# 248 bf16 rows of V = 50,400 (100.8 KB).
L2_BUDGET = 0.5
# Training mode moves 2L when its rows fit, on as many SMs as they allow; two kernels move 3L on every SM. With
# fewer than this share of the SMs streaming, 2L would take longer than 3L on all (each SM pulling its share of
# the bandwidth), so `auto` runs two kernels there.
MIN_SM_SHARE = 2 / 3
# Two CTAs per SM (blocks of MAX_GRAD_BLOCK_V / 2, 512 threads) where the rows in flight allow 1.5 rows per SM:
# one CTA's per-row tail (reductions, barriers, dependent loads) overlaps the other's streaming, and the SASS
# model counts fewer instructions per logit (19.4 instead of 26.1 at V = 50,400 bf16: a quarter of the threads'
# tail and a smaller last partial block), the same bytes in flight per SM.
TWO_CTAS_PER_SM = 1.5
# Registers per thread the persistent grid assumes when it counts the CTAs an SM holds (64K registers each): the
# AOT report checks that every forward_grad variant stays within (tests/test_aot.py).
MAX_GRAD_REGISTERS = 64
# What the launcher assumes where the device does not say (CPU tensors, or `python -m apa_fast.info --design`
# without a GPU): an H100 SXM, 132 SMs and 50 MB of L2.
DEFAULT_SMS, DEFAULT_L2_BYTES = 132, 50 * 2**20


def block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the forward and backward: the whole row up to MAX_BLOCK_V."""
    block = min(triton.next_power_of_2(max(vocab, 16)), MAX_BLOCK_V)
    num_warps = 2 if block <= 512 else 4 if block <= 2048 else 8
    return block, num_warps


def l2_rows(row_bytes: int, l2_bytes: int = DEFAULT_L2_BYTES) -> int:
    """How many rows of ``row_bytes`` stay in L2 at once (`L2_BUDGET` of it; at least one)."""
    return max(1, int(L2_BUDGET * l2_bytes) // max(row_bytes, 1))


def grad_block_config(vocab: int, row_bytes: int = 0, sms: int = DEFAULT_SMS,
                      l2_bytes: int = DEFAULT_L2_BYTES) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the forward-with-gradient kernel: 16 elements per thread, up to 32 warps; half the
    block (two CTAs per SM) where `l2_rows` allows `TWO_CTAS_PER_SM` rows per SM."""
    block = min(triton.next_power_of_2(max(vocab, 16)), MAX_GRAD_BLOCK_V)
    if block == MAX_GRAD_BLOCK_V and l2_rows(row_bytes, l2_bytes) >= TWO_CTAS_PER_SM * sms:
        block //= 2
    return block, max(1, min(32, block // 512))


def grad_programs(rows: int, row_bytes: int, num_warps: int, sms: int = DEFAULT_SMS,
                  l2_bytes: int = DEFAULT_L2_BYTES) -> int:
    """Programs of the persistent forward-with-gradient kernel: its rows in flight.

    As many rows as stay in L2 (`l2_rows`: SMs are left idle rather than the re-read missing), at most what the
    SMs hold at once (2,048 threads and 64K registers each, at `MAX_GRAD_REGISTERS`: a program that waited for a
    slot would run its rows after the others), never more than ``rows``.
    """
    threads = 32 * num_warps
    per_sm = max(1, min(2048 // threads, 65536 // (MAX_GRAD_REGISTERS * threads)))
    return max(1, min(rows, l2_rows(row_bytes, l2_bytes), per_sm * sms))


def training_mode_pays(row_bytes: int, sms: int = DEFAULT_SMS, l2_bytes: int = DEFAULT_L2_BYTES) -> bool:
    """The byte model's choice: training mode (2L) where enough rows stay in L2 to keep `MIN_SM_SHARE` of the SMs
    streaming, else two kernels (3L)."""
    return l2_rows(row_bytes, l2_bytes) >= MIN_SM_SHARE * sms


def device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes) of ``device``; `DEFAULT_SMS`, `DEFAULT_L2_BYTES` where it is not a CUDA device."""
    if device.type != "cuda":
        return DEFAULT_SMS, DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "L2_cache_size", DEFAULT_L2_BYTES)


@dataclasses.dataclass(frozen=True)
class Design:
    """What runs for ``rows`` token rows of ``vocab`` logits of ``itemsize`` bytes in training mode
    (`design`)."""

    rows: int
    vocab: int
    itemsize: int
    sms: int
    l2_bytes: int
    training_mode: bool  # the byte model's choice (``APA_FAST_FUSED_GRAD=auto``)
    block_v: int  # training mode's launch, forced or chosen
    num_warps: int
    programs: int

    @property
    def rows_in_flight_bytes(self) -> int:
        return self.programs * self.vocab * self.itemsize

    @property
    def ctas_per_sm(self) -> int:
        return -(-self.programs // self.sms)

    @property
    def training_mode_bytes(self) -> int:
        """Training mode's DRAM bytes (forward + backward of a scalar loss) over L, the logits' bytes: 2 when its rows
        in flight stay in L2 (always, unless a single row exceeds the budget: then 3). Two kernels move 3."""
        return 2 if self.rows_in_flight_bytes <= L2_BUDGET * self.l2_bytes else 3


def design(rows: int, vocab: int, itemsize: int, sms: int = DEFAULT_SMS, l2_bytes: int = DEFAULT_L2_BYTES) -> Design:
    """The byte model's design and training mode's launch for ``rows`` x ``vocab`` logits of ``itemsize`` bytes on
    a GPU with ``sms`` SMs and ``l2_bytes`` of L2 (default: an H100 SXM)."""
    row_bytes = vocab * itemsize
    block, num_warps = grad_block_config(vocab, row_bytes, sms, l2_bytes)
    return Design(rows, vocab, itemsize, sms, l2_bytes, training_mode_pays(row_bytes, sms, l2_bytes), block,
                  num_warps, grad_programs(rows, row_bytes, num_warps, sms, l2_bytes))


# ----------------------------------------------------------------------------------------------------
# Device helpers shared by the kernels.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner):
    # int64 before any multiplication: rows x V may exceed 2**31 elements.
    outer = row // inner_size
    inner = row - outer * inner_size
    return logits_ptr + outer * stride_outer + inner * stride_inner


@triton.jit
def _row_parts(base, vocab, VEC: tl.constexpr):
    """(head, body) of the row starting at ``base``: its first ``head`` columns lie before the first 16-byte
    boundary, the next ``body`` columns (a multiple of ``VEC``) are whole 16-byte vectors, and the tail, columns
    ``[head + body, vocab)``, is shorter than ``VEC``. ``VEC`` is 1 for a strided row (head 0, body ``vocab``).

    The misalignment is the row's own: a row of odd V in a contiguous ``(N, V)`` tensor starts at another offset
    from a 16-byte boundary than the row before it. ``base`` is a multiple of the element size (torch's).
    """
    elsize: tl.constexpr = base.dtype.element_ty.primitive_bitwidth // 8
    head = ((VEC - (base.to(tl.int64) // elsize) % VEC) % VEC).to(tl.int32)
    head = tl.minimum(head, vocab)
    return head, (vocab - head) // VEC * VEC


@triton.jit
def _body_base(base, head, stride_v, VEC: tl.constexpr):
    """The pointer to the row's column ``head``, with the alignment hint the compiler cannot infer (the row start is
    a runtime value): ``VEC`` elements, i.e. 16 bytes for a contiguous row, so that the body loads and stores are
    128-bit whatever V and the row's offset."""
    elsize: tl.constexpr = base.dtype.element_ty.primitive_bitwidth // 8
    return tl.multiple_of(base + head * stride_v, VEC * elsize)


@triton.jit
def _row_edges(head, body, limit, VEC: tl.constexpr):
    """The head's and the tail's columns as one ``(2 * VEC,)`` tile: (columns, whether each is below ``limit``, the
    vocabulary, or 0 for a row that reads nothing; an integer bound rather than a boolean, which the interpreter
    cannot broadcast into a mask)."""
    k = tl.arange(0, 2 * VEC)
    cols = tl.where(k < VEC, k, head + body + k - VEC)
    return cols, (k < tl.minimum(head, limit)) | ((k >= VEC) & (cols < limit))  # head < VEC


@triton.jit
def _row_logsumexp2(base, stride_v, counted, vocab, scale2, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                    ENTROPY: tl.constexpr):
    """(log2(sum(exp2(x * scale2))), entropy) over the row's columns (none when not ``counted``: -inf and 0). The
    entropy (natural log, 0 for a row with no finite column) only when ``ENTROPY``, else 0.

    The loop runs over the row's body (`_row_parts`) in blocks read as ``(BLOCK_V // VEC, VEC)`` groups of ``VEC``
    adjacent columns (16 bytes: one aligned vector load, held by one thread; its mask is constant over the group).
    Each group keeps its own running maximum ``m`` and sum ``s`` (relative to ``m``) across the loop, so the
    per-block maximum and sum are reductions inside a thread, and the groups are combined once at the end, with
    the head and tail columns (`_row_edges`): no cross-thread reduction, hence no barrier or shuffle, inside the
    loop. The maximum is taken on the raw logits and scaled after (``scale2 > 0`` commutes with max), and
    ``exp2`` is fed ``fma(x, scale2, -m)``: about one exponential and four arithmetic instructions per logit.
    """
    head, body = _row_parts(base, vocab, VEC)
    body_base = _body_base(base, head, stride_v, VEC)
    groups = tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full((BLOCK_V // VEC,), _MOST_NEGATIVE, tl.float32)
    s = tl.zeros((BLOCK_V // VEC,), tl.float32)
    t = tl.zeros((BLOCK_V // VEC,), tl.float32)  # ENTROPY: sum 2^(y - m) * (y - m); unused (and removed) otherwise
    for start in range(0, tl.where(counted, body, 0), BLOCK_V):
        x = tl.load(body_base + (start + groups) * stride_v, mask=start + groups < body, other=float("-inf"))
        x = x.to(tl.float32)
        # m is finite (it starts at the most negative float): padded and -inf lanes give exp2(-inf) = 0, and
        # m - new_m <= 0 is never -inf - -inf.
        new_m = tl.maximum(m, tl.max(x, axis=1) * scale2)
        if ENTROPY:
            d = tl.maximum(x * scale2 - new_m[:, None], _EXP2_FLOOR)
            e = tl.exp2(d)
            shift = tl.maximum(m - new_m, _EXP2_FLOOR)
            alpha = tl.exp2(shift)
            # t relative to new_m: sum e_old * (y - m + shift) * alpha, then this block's terms.
            t = alpha * (t + s * shift) + tl.sum(e * d, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
        else:
            s = s * tl.exp2(m - new_m) + tl.sum(tl.exp2(x * scale2 - new_m[:, None]), axis=1)
        m = new_m
    cols, read = _row_edges(head, body, tl.where(counted, vocab, 0), VEC)
    y = tl.load(base + cols * stride_v, mask=read, other=float("-inf")).to(tl.float32) * scale2
    row_max = tl.maximum(tl.max(m, axis=0), tl.max(y, axis=0))  # finite: m starts at the most negative float
    # m, y <= row_max: every factor is in [0, 1]; an all -inf row sums to 0 and gives -inf, as torch does.
    lse2 = row_max + tl.log2(tl.sum(s * tl.exp2(m - row_max), axis=0) + tl.sum(tl.exp2(y - row_max), axis=0))
    entropy = tl.zeros((), tl.float32)
    if ENTROPY:
        shift = tl.maximum(m - row_max, _EXP2_FLOOR)
        alpha = tl.exp2(shift)
        d = tl.maximum(y - row_max, _EXP2_FLOOR)
        e = tl.exp2(d)
        total = tl.sum(s * alpha, axis=0) + tl.sum(e, axis=0)
        # -sum p log2 p = log2 S - T / S, S and T relative to the row maximum.
        entropy = tl.where(total > 0, (tl.log2(total) - (tl.sum(alpha * (t + s * shift), axis=0)
                                                         + tl.sum(e * d, axis=0)) / total) * _LN2, 0.0)
    return lse2, entropy


@triton.jit
def _softmax_grad(x, scale2, lse2, a, b, ENTROPY: tl.constexpr):
    """float32 ``p * (a + b * log2 p)`` of logits ``x``, ``p = exp2(x * scale2 - lse2)`` the softmax; ``a * p``
    without ``ENTROPY``. Two instructions and an exponential per logit (four more with the entropy)."""
    if ENTROPY:
        log2p = tl.maximum(x.to(tl.float32) * scale2 - lse2, _EXP2_FLOOR)
        return tl.exp2(log2p) * (a + b * log2p)
    return a * tl.exp2(x.to(tl.float32) * scale2 - lse2)


@triton.jit
def _row_gradient(base, stride_v, grad_base, grad_stride_v, counted, label, target2, vocab, scale2, lse2, coef, a, b,
                  BLOCK_V: tl.constexpr, VEC: tl.constexpr, GRAD_VEC: tl.constexpr, ENTROPY: tl.constexpr):
    """Write the row's gradient ``coef * onehot(label) + p * (a + b * log2 p)`` (`_softmax_grad`) at ``grad_base``.

    ``lse2``: the row's log-sum-exp of ``x * scale2`` (0 where not ``counted``), ``target2`` the label's ``x *
    scale2``. Rows that do not count read nothing (x = -inf, p = 0) and, with ``coef = a = b = +0.0``, get exact
    zeros. The loop covers the row's body in ``BLOCK_V`` blocks of aligned vectors (``GRAD_VEC``: the gradient
    rows' alignment, ``VEC`` when they start at the logits rows' offsets from a 16-byte boundary, else 1), then
    the head and tail columns. Every access is the last use of its line (the gradient is not read again here):
    evict-first, so that the lines of rows being re-read stay in L2. The label's column is corrected after the
    loop: no per-column label test.
    """
    head, body = _row_parts(base, vocab, VEC)
    body_base = _body_base(base, head, stride_v, VEC)
    grad_body = _body_base(grad_base, head, grad_stride_v, GRAD_VEC)
    read_to = tl.where(counted, body, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, body, BLOCK_V):
        x = tl.load(body_base + (start + cols) * stride_v, mask=start + cols < read_to, other=float("-inf"),
                    eviction_policy="evict_first")
        tl.store(grad_body + (start + cols) * grad_stride_v,
                 _softmax_grad(x, scale2, lse2, a, b, ENTROPY).to(grad_base.dtype.element_ty),
                 mask=start + cols < body, eviction_policy="evict_first")
    edge, read = _row_edges(head, body, tl.where(counted, vocab, 0), VEC)
    x = tl.load(base + edge * stride_v, mask=read, other=float("-inf"))
    edge, write = _row_edges(head, body, vocab, VEC)
    tl.store(grad_base + edge * grad_stride_v, _softmax_grad(x, scale2, lse2, a, b, ENTROPY).to(
        grad_base.dtype.element_ty), mask=write)
    # The barrier orders the label's store after the store of the same element above, made by whichever thread
    # held that column.
    tl.debug_barrier()
    label_grad = coef + _softmax_grad(target2, 1.0, lse2, a, b, ENTROPY)
    tl.store(grad_base + tl.where(counted, label, 0) * grad_stride_v, label_grad.to(grad_base.dtype.element_ty),
             mask=counted)


@triton.jit
def _loss_epilogue(logp, row, aux_ptr, adv_ptr, param0, param1, LOSS: tl.constexpr):
    """(per-token loss, d loss / d logp) in float32; the twin of `apa_fast.kinds.LossKind.epilogue`."""
    if LOSS == _LOGPROB:
        loss = logp
        dlogp = tl.full((), 1.0, tl.float32)
    elif LOSS == _APA:
        # param0 = 1 / lam.  r = logp - log pi_init - A / lam;  loss = r^2.
        residual = logp - tl.load(aux_ptr + row) - tl.load(adv_ptr + row) * param0
        loss = residual * residual
        dlogp = 2.0 * residual
    elif LOSS == _PPO:
        # param0 = clip epsilon. aux = log-prob under the sampling policy.
        adv = tl.load(adv_ptr + row)
        ratio = tl.exp(logp - tl.load(aux_ptr + row))
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - param0), 1.0 + param0)
        loss = tl.maximum(unclipped, clipped)
        # The clipped branch is constant in logp; where both agree the ratio is inside the clip range.
        dlogp = tl.where(unclipped >= clipped, unclipped, 0.0)
    else:
        tl.static_assert(LOSS == _AWR, "LOSS is not a kind of apa_fast.kinds.KINDS with an epilogue here")
        # param0 = 1 / lam, param1 = the weight cap: loss = -min(exp(A / lam), cap) * logp.
        weight = tl.minimum(tl.exp(tl.load(adv_ptr + row) * param0), param1)
        loss = -weight * logp
        dlogp = -weight
    return loss, dlogp


@triton.jit
def _row_forward(base, stride_v, row, label, counted, aux_ptr, adv_ptr, logp_ptr, lse_ptr, loss_ptr, dlogp_ptr,
                 entropy_ptr, vocab, scale2, param0, param1, LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
                 VEC: tl.constexpr, ENTROPY: tl.constexpr):
    """The row's log-sum-exp, log-prob and loss; stores the four per-row outputs (five with ``ENTROPY``: the
    entropy at ``entropy_ptr``), returns (lse2, target2, dlogp, entropy).

    ``lse2`` is the log-sum-exp in base 2 (of ``x * scale2``), ``target2`` the label's ``x * scale2``, ``dlogp``
    and ``entropy`` 0 where the row does not count. Rows that do not count read nothing.
    """
    lse2, entropy = _row_logsumexp2(base, stride_v, counted, vocab, scale2, BLOCK_V, VEC, ENTROPY)
    target2 = tl.load(base + tl.where(counted, label, 0) * stride_v, mask=counted, other=0.0).to(tl.float32) * scale2
    logp = tl.where(counted, (target2 - lse2) * _LN2, 0.0)
    loss, dlogp = _loss_epilogue(logp, row, aux_ptr, adv_ptr, param0, param1, LOSS)
    dlogp = tl.where(counted, dlogp, 0.0)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, tl.where(counted, lse2 * _LN2, 0.0))
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(dlogp_ptr + row, dlogp)
    if ENTROPY:
        tl.store(entropy_ptr + row, entropy)  # 0 where the row does not count: it read nothing
    return lse2, target2, dlogp, entropy


# ----------------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _logprob_fwd_kernel(
    logits_ptr, stride_outer, stride_inner, stride_v, inner_size,
    labels_ptr, aux_ptr, adv_ptr,
    logp_ptr, lse_ptr, loss_ptr, dlogp_ptr, entropy_ptr,
    vocab, inv_temperature, param0, param1,
    LOSS: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner)
    label = tl.load(labels_ptr + row)
    _row_forward(base, stride_v, row, label, label >= 0, aux_ptr, adv_ptr, logp_ptr, lse_ptr, loss_ptr, dlogp_ptr,
                 entropy_ptr, vocab, inv_temperature * _LOG2E, param0, param1, LOSS, BLOCK_V, VEC, ENTROPY)


@triton.jit
def _logprob_fwd_grad_kernel(
    logits_ptr, stride_outer, stride_inner, stride_v, inner_size,
    grad_ptr, grad_stride_outer, grad_stride_inner, grad_stride_v,
    labels_ptr, aux_ptr, adv_ptr, row_scale_ptr,
    logp_ptr, lse_ptr, loss_ptr, dlogp_ptr, entropy_ptr,
    rows, vocab, inv_temperature, param0, param1, entropy_coef,
    LOSS: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, GRAD_VEC: tl.constexpr, ENTROPY: tl.constexpr,
):
    # Persistent: the launcher starts as many programs as it wants rows in flight (`grad_programs`), and each
    # takes every num_programs-th row, so the rows resident at once do not depend on the compiler's registers.
    scale2 = inv_temperature * _LOG2E
    grad_scale = tl.load(row_scale_ptr) * inv_temperature
    for row in range(tl.program_id(0).to(tl.int64), rows, tl.num_programs(0)):  # int64 row offsets
        base = _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner)
        label = tl.load(labels_ptr + row)
        counted = label >= 0
        lse2, target2, dlogp, entropy = _row_forward(base, stride_v, row, label, counted, aux_ptr, adv_ptr,
                                                     logp_ptr, lse_ptr, loss_ptr, dlogp_ptr, entropy_ptr, vocab,
                                                     scale2, param0, param1, LOSS, BLOCK_V, VEC, ENTROPY)
        # Second pass: the row was read a moment ago and is still in L2 (`_row_gradient`).
        coef = grad_scale * dlogp  # 0 for rows that do not count
        if ENTROPY:
            # -g_H = entropy_coef * grad_scale (the objective is row_scale * sum(loss - entropy_coef * H)); a = b =
            # +0.0 on rows that do not count.
            a = tl.where(counted, entropy_coef * grad_scale * entropy - coef, 0.0)
            b = tl.where(counted, entropy_coef * grad_scale * _LN2, 0.0)
        else:
            a = 0.0 - coef  # +0.0, not -0.0, when coef is 0: exact zero gradients
            b = 0.0
        grad_base = _row_base(grad_ptr, row, inner_size, grad_stride_outer, grad_stride_inner)
        # Rows that do not count: lse2 0 (not -inf), so that x = -inf gives softmax exp2(-inf) = 0.
        _row_gradient(base, stride_v, grad_base, grad_stride_v, counted, label, target2, vocab, scale2,
                      tl.where(counted, lse2, 0.0), coef, a, b, BLOCK_V, VEC, GRAD_VEC, ENTROPY)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr, stride_outer, stride_inner, stride_v, inner_size,
    grad_ptr, grad_stride_outer, grad_stride_inner, grad_stride_v,
    labels_ptr, lse_ptr, row_grad_ptr, entropy_ptr, entropy_grad_ptr,
    vocab, inv_temperature,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, GRAD_VEC: tl.constexpr, ENTROPY: tl.constexpr,
):
    # One program per row: the gradient is row_grad / T * (onehot(label) - softmax), plus, with the entropy,
    # -entropy_grad / T * p * (ln p + H), i.e. `_row_gradient`'s p * (a + b * log2 p) + coef * onehot.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    counted = label >= 0
    scale2 = inv_temperature * _LOG2E
    base = _row_base(logits_ptr, row, inner_size, stride_outer, stride_inner)
    target2 = tl.load(base + tl.where(counted, label, 0) * stride_v, mask=counted, other=0.0).to(tl.float32) * scale2
    coef = tl.load(row_grad_ptr + row) * inv_temperature  # 0 where the row does not count
    if ENTROPY:
        entropy_grad = tl.load(entropy_grad_ptr + row) * inv_temperature  # 0 where the row does not count
        a = tl.where(counted, -coef - entropy_grad * tl.load(entropy_ptr + row), 0.0)
        b = tl.where(counted, -entropy_grad * _LN2, 0.0)
    else:
        a = 0.0 - coef  # +0.0 when coef is 0
        b = 0.0
    grad_base = _row_base(grad_ptr, row, inner_size, grad_stride_outer, grad_stride_inner)
    # The forward's lse is 0 on rows that do not count.
    _row_gradient(base, stride_v, grad_base, grad_stride_v, counted, label, target2, vocab, scale2,
                  tl.load(lse_ptr + row) * _LOG2E, coef, a, b, BLOCK_V, VEC, GRAD_VEC, ENTROPY)


# ----------------------------------------------------------------------------------------------------
# Launchers. Each pass has a `_*_launch` that returns (kernel, grid, args, meta) and a public launcher
# that runs it; `aot_variants` compiles the very same argument lists ahead of time.
# ----------------------------------------------------------------------------------------------------
def _layout(rows3d: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_outer, stride_inner, stride_v, inner_size) of an ``(outer, inner, V)`` view."""
    return rows3d.stride(0), rows3d.stride(1), rows3d.stride(2), rows3d.shape[1]


def _vector(rows3d: torch.Tensor) -> int:
    """Columns per 16-byte vector of a contiguous row (the group size of the row pass's per-thread running max
    and sum, and the alignment of each row's body), 1 for a strided one (its columns are not adjacent)."""
    return 16 // rows3d.element_size() if rows3d.stride(2) == 1 or rows3d.shape[2] == 1 else 1


def _grad_vector(rows3d: torch.Tensor, out3d: torch.Tensor) -> int:
    """The gradient rows' alignment in columns: `_vector` when each row of ``out3d`` starts at the same offset from
    a 16-byte boundary as the same row of ``rows3d`` (in place, or a buffer from `apa_fast.rows.gradient_buffer`),
    so that the body's stores are aligned vectors too; else 1 (scalar stores, the loads still vectors)."""
    vec = min(_vector(rows3d), _vector(out3d))
    same = (rows3d.data_ptr() - out3d.data_ptr()) % 16 == 0 and all(
        rows3d.shape[dim] == 1 or (rows3d.stride(dim) - out3d.stride(dim)) * rows3d.element_size() % 16 == 0
        for dim in (0, 1))
    return vec if same else 1


def _per_row_outputs(outputs):
    """The five per-row output pointers (logp, lse, loss, dlogp, entropy) from four or five float32 rows: without
    the entropy its pointer repeats dlogp's and is never written (ENTROPY off)."""
    return (*outputs[:4], outputs[4] if len(outputs) > 4 else outputs[3])


def _forward_launch(rows3d, labels, aux, adv, outputs, *, loss_kind, inv_temperature, param0, param1):
    vocab = rows3d.shape[-1]
    block, num_warps = block_config(vocab)
    args = (rows3d, *_layout(rows3d), labels, aux, adv, *_per_row_outputs(outputs), vocab, inv_temperature, param0,
            param1)
    return _logprob_fwd_kernel, (labels.numel(),), args, {"LOSS": loss_kind, "BLOCK_V": block, "VEC": _vector(rows3d),
                                                          "ENTROPY": len(outputs) > 4, "num_warps": num_warps}


def _forward_grad_launch(rows3d, labels, aux, adv, out3d, row_scale, outputs, *, loss_kind, inv_temperature, param0,
                         param1, entropy_coef=0.0, limits=None):
    rows, vocab = labels.numel(), rows3d.shape[-1]
    sms, l2_bytes = limits or device_limits(rows3d.device)
    block, num_warps = grad_block_config(vocab, vocab * rows3d.element_size(), sms, l2_bytes)
    programs = grad_programs(rows, vocab * rows3d.element_size(), num_warps, sms, l2_bytes)
    args = (rows3d, *_layout(rows3d), out3d, *_layout(out3d)[:3], labels, aux, adv, row_scale,
            *_per_row_outputs(outputs), rows, vocab, inv_temperature, param0, param1, entropy_coef)
    return _logprob_fwd_grad_kernel, (programs,), args, {
        "LOSS": loss_kind, "BLOCK_V": block, "VEC": _vector(rows3d), "GRAD_VEC": _grad_vector(rows3d, out3d),
        "ENTROPY": len(outputs) > 4, "num_warps": num_warps}


def _backward_launch(rows3d, labels, lse, row_grad, out3d, *, inv_temperature, entropy=None, entropy_grad=None):
    vocab = rows3d.shape[-1]
    block, num_warps = block_config(vocab)
    with_entropy = entropy_grad is not None
    args = (rows3d, *_layout(rows3d), out3d, *_layout(out3d)[:3], labels, lse, row_grad,
            entropy if with_entropy else lse, entropy_grad if with_entropy else row_grad, vocab, inv_temperature)
    return _logprob_bwd_kernel, (labels.numel(),), args, {
        "BLOCK_V": block, "VEC": _vector(rows3d), "GRAD_VEC": _grad_vector(rows3d, out3d), "ENTROPY": with_entropy,
        "num_warps": num_warps}


def _run(launch) -> None:
    kernel, grid, args, meta = launch
    kernel[grid](*args, **meta)


def forward(rows3d, labels, aux, adv, *, loss_kind, inv_temperature, param0=0.0, param1=0.0, entropy=False):
    """Launch the forward on ``rows3d (outer, inner, V)`` (float32, bfloat16 or float16, any strides).

    ``labels``: int32 ``(outer * inner,)``, negative where the row does not count; ``aux``, ``adv``:
    float32 ``(rows,)`` (may be empty for the kinds that do not read them); ``loss_kind``: a
    `apa_fast.kinds.LossKind` id; ``inv_temperature`` in [1e-6, 1e6]. Returns float32 ``(rows,)`` tensors
    ``(logp, lse, loss, dlogp)``, and the entropy of ``softmax(rows3d / T)`` fifth when ``entropy``, all 0 where
    the row does not count (for LOGPROB, ``loss`` is ``logp``).
    """
    rows = labels.numel()
    outputs = torch.empty((4 + entropy, rows), dtype=torch.float32, device=rows3d.device)
    if rows:
        _run(_forward_launch(rows3d, labels, aux, adv, outputs, loss_kind=loss_kind, inv_temperature=inv_temperature,
                             param0=param0, param1=param1))
    return tuple(outputs)


def forward_grad(rows3d, labels, aux, adv, out3d, row_scale, *, loss_kind, inv_temperature, param0=0.0, param1=0.0,
                 entropy=False, entropy_coef=0.0):
    """The forward and the gradient in one kernel (training mode); same outputs as `forward`.

    Also writes ``out3d[r] = row_scale * dlogp[r] * (onehot(labels[r]) - softmax(rows3d[r] / T)) / T`` in
    ``out3d``'s dtype: the gradient of ``row_scale * sum(loss)`` with respect to the logits (with ``entropy``, of
    ``row_scale * sum(loss - entropy_coef * entropy)``: plus ``row_scale * entropy_coef * p * (ln p + H) / T``,
    with ``p`` the softmax). ``out3d``:
    ``(outer, inner, V)`` like ``rows3d``, same dtype, any strides; it may be ``rows3d`` itself (in place).
    ``row_scale``: float32 tensor of one element on the same device (e.g. ``1 / count`` for a mean, computed
    on the device: no host sync). Rows that do not count read nothing and get exact zero gradient rows.
    """
    rows = labels.numel()
    outputs = torch.empty((4 + entropy, rows), dtype=torch.float32, device=rows3d.device)
    if rows:
        _run(_forward_grad_launch(rows3d, labels, aux, adv, out3d, row_scale, outputs, loss_kind=loss_kind,
                                  inv_temperature=inv_temperature, param0=param0, param1=param1,
                                  entropy_coef=entropy_coef))
    return tuple(outputs)


def backward(rows3d, labels, lse, row_grad, out3d, *, inv_temperature, entropy=None, entropy_grad=None):
    """Write ``dlogits`` for ``rows3d`` into ``out3d`` (same shape; may be ``rows3d`` itself).

    ``row_grad``: float32 ``(rows,)``, the upstream gradient times ``d loss / d logp`` (0 where the row
    does not count); ``lse``: the forward's. ``entropy``/``entropy_grad`` (float32 ``(rows,)``, both or neither):
    the forward's entropy and its upstream gradient (0 where the row does not count), which add
    ``-entropy_grad * p * (ln p + H) / T``. Returns ``out3d``.
    """
    if labels.numel():
        _run(_backward_launch(rows3d, labels, lse, row_grad, out3d, inv_temperature=inv_temperature, entropy=entropy,
                              entropy_grad=entropy_grad))
    return out3d


# ----------------------------------------------------------------------------------------------------
# Ahead-of-time variants: what the launchers run for the shapes users have.
# ----------------------------------------------------------------------------------------------------
AOT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Aligned (V % 16 == 0: GPT-J / Pythia), unaligned (GPT-2's 50,257), and a small one-block vocabulary.
AOT_VOCABS = (50400, 50257, 1024)


def aot_variants(vocabs=AOT_VOCABS, dtypes=AOT_DTYPES, kinds=KINDS, entropy=(False, True)):
    """Every launch the launchers make for ``vocabs`` x ``dtypes`` x ``kinds`` x ``entropy`` (off, on), as they
    make it.

    Yields dicts with ``kernel`` (the JIT function), ``pass`` ("forward", "forward_grad", "backward"),
    ``kind`` (a `LossKind` name; None for the backward), ``entropy`` (the ENTROPY switch), ``dtype``, ``vocab``,
    ``grid``, ``args`` and ``meta``
    (the launch's grid, positional arguments and keywords; forward_grad's grid as on an H100). The arguments
    are meta-device tensors laid out as a causal LM passes them (``logits[:, :-1]`` of a contiguous
    ``(8, 512, V)`` buffer; the gradient in the buffer the ops allocate, `apa_fast.rows.gradient_buffer`), so
    Triton's runtime specialisation (16-byte aligned pointers, integers divisible by 16, unit strides) applied to
    them is the one a real call gets.
    """
    for vocab in vocabs:
        for dtype in dtypes:
            logits = torch.empty((8, 512, vocab), dtype=dtype, device="meta")[:, :-1]
            rows = logits.shape[0] * logits.shape[1]
            out3d = gradient_buffer(logits)
            labels = torch.empty(rows, dtype=torch.int32, device="meta")
            floats = torch.empty((7, rows), dtype=torch.float32, device="meta")
            row_scale = torch.empty((), dtype=torch.float32, device="meta")
            for with_entropy in entropy:
                outputs = tuple(floats[:5 if with_entropy else 4])
                common = {"dtype": str(dtype).removeprefix("torch."), "vocab": vocab, "entropy": with_entropy}
                for kind in kinds:
                    aux = floats[5] if kind.aux else floats[0][:0]
                    adv = floats[6] if kind.reads_advantages else floats[0][:0]
                    params = {"loss_kind": kind.id, "inv_temperature": 1.0, "param0": 0.5, "param1": 2.0}
                    launch = _forward_launch(logits, labels, aux, adv, outputs, **params)
                    yield _variant("forward", kind.name, launch, **common)
                    launch = _forward_grad_launch(logits, labels, aux, adv, out3d, row_scale, outputs, **params,
                                                  entropy_coef=0.01, limits=(DEFAULT_SMS, DEFAULT_L2_BYTES))
                    yield _variant("forward_grad", kind.name, launch, **common)
                entropy_args = {"entropy": floats[4], "entropy_grad": floats[5]} if with_entropy else {}
                launch = _backward_launch(logits, labels, floats[1], floats[3], out3d, inv_temperature=1.0,
                                          **entropy_args)
                yield _variant("backward", None, launch, **common)


def _variant(pass_name, kind, launch, *, dtype, vocab, entropy):
    kernel, grid, args, meta = launch
    return {"kernel": kernel, "pass": pass_name, "kind": kind, "entropy": entropy, "dtype": dtype, "vocab": vocab,
            "args": args, "meta": meta, "grid": grid}

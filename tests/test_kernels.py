"""The Triton launchers of `apa_fast.kernels.logprob`, called directly, against a float64 reference.

Runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): shapes stay small and the block
caps are lowered so that small vocabularies still span several blocks, end in a partial block, or fit one.
Every pass ("forward", "forward_grad", "backward") of every kind of `apa_fast.kinds.KINDS` is checked.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from apa_fast.kernels import logprob as K
from conftest import assert_close_rel, rel_err
from oracles import LOGP_ROUNDING
from test_entropy import _check_impl as _check_passes_with_entropy

from apa_fast.kinds import APA, KINDS, LOGPROB
from apa_fast.rows import gradient_buffer

HYPER = {"lam": 0.5, "clip_eps": 0.2, "max_weight": 5.0}
UNPATCHED_GRAD_PROGRAMS = K.grad_programs  # the fixture below replaces it in every test
# Relative L2 tolerances: values are float32-accurate whatever the input dtype; gradients are stored in the
# logits' dtype (the interpreter truncates bf16/fp16 stores where a GPU rounds: up to one unit in the last place).
VALUE_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Blocks of 64 columns (both kernels): a vocabulary of a few hundred spans several blocks. The persistent
    forward-with-gradient kernel runs two programs, so that each program takes several rows in turn.
    GPU tests keep the real configuration."""
    if request.node.get_closest_marker("cuda"):
        return
    monkeypatch.setattr(K, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(K, "MAX_GRAD_BLOCK_V", 64)
    monkeypatch.setattr(K, "grad_programs", lambda rows, *args: min(rows, 2))


def _params(kind):
    return kind.kernel_params(**{name: HYPER[name] for name in kind.hyper})


def _token_data(kind, rows, device="cpu"):
    """Labels are set by the caller; aux/adv as the host passes them (empty when the kind reads none)."""
    aux = -3.0 - 2.0 * torch.rand(rows, device=device)
    adv = torch.randn(rows, device=device)
    empty = torch.empty(0, device=device)
    return aux, adv, (aux if kind.aux else empty), (adv if kind.reads_advantages else empty)


def _reference(rows3d, labels, aux, adv, kind, inv_temperature, row_scale=1.0, logp_rel_shift=0.0):
    """float64 (logp, lse, loss, dlogp, dlogits (rows, V)) of the kernels' contract; 0 where not counted.
    ``logp_rel_shift`` moves the log-probs fed to the epilogue by that relative amount (see `_float32_floors`)."""
    x = rows3d.reshape(-1, rows3d.shape[-1]).double() * inv_temperature
    counted = labels >= 0
    safe = torch.where(counted, labels, 0).long()
    lse = torch.logsumexp(x, -1)
    logp = (x.gather(-1, safe[:, None])[:, 0] - lse) * (1.0 + logp_rel_shift)
    loss, dlogp = kind.epilogue(logp, aux.double(), adv.double(), *_params(kind))
    zero = torch.zeros((), dtype=torch.float64)
    logp, lse, loss, dlogp = (torch.where(counted, t, zero) for t in (logp, lse, loss, dlogp))
    onehot = torch.nn.functional.one_hot(safe, x.shape[-1]).double()
    softmax = torch.exp(x - torch.where(counted, lse, zero)[:, None])
    grad = (row_scale * dlogp * inv_temperature)[:, None] * (onehot - softmax)
    grad = torch.where(counted[:, None], grad, zero)
    return logp, lse, loss, dlogp, grad


def _float32_floors(expected, *args):
    """Per output of `_reference`, the error norm no float32 computation of the log-probs can avoid: how far the
    float64 answer moves when every log-prob moves by a few float32 roundings (``LOGP_ROUNDING``). It exceeds
    the tolerance only where a term nearly cancels (an APA residual of 1e-3 at logp -8)."""
    shifted = [_reference(*args, logp_rel_shift=shift) for shift in (LOGP_ROUNDING, -LOGP_ROUNDING)]
    return [max((s[i] - expected[i]).norm().item() for s in shifted) for i in range(len(expected))]


def _grad_tol(expected_grad, dtype, tol_scale=1.0):
    """GRAD_TOL, plus twice the error that rounding the exact gradient to ``dtype`` makes by itself: tiny
    gradients (PPO's clipped rows, a small softmax) sit among float16's subnormals."""
    return GRAD_TOL[dtype] * tol_scale + 2 * rel_err(expected_grad.to(dtype), expected_grad)


def _check_all_passes(rows3d, labels, kind, *, inv_temperature=1.0, out3d=None, tol_scale=1.0,
                      grad_buffer=torch.empty_like):
    """Run forward, backward and forward_grad on ``rows3d`` and compare each with the float64 reference; the
    gradients go to ``grad_buffer(rows3d)`` (forward_grad's to ``out3d`` when given)."""
    rows = labels.numel()
    aux, adv, aux_k, adv_k = _token_data(kind, rows, rows3d.device)
    row_scale = 1.0 / max(int((labels >= 0).sum()), 1)
    expected = _reference(rows3d, labels, aux, adv, kind, inv_temperature, row_scale)
    floors = _float32_floors(expected, rows3d, labels, aux, adv, kind, inv_temperature, row_scale)
    grad_tol = _grad_tol(expected[4], rows3d.dtype, tol_scale)
    value_scales = [floor / (VALUE_TOL * tol_scale) for floor in floors[:4]]
    grad_scale = floors[4] / grad_tol
    pristine = rows3d.clone()
    params = dict(zip(("param0", "param1"), _params(kind), strict=True))

    outputs = K.forward(rows3d, labels, aux_k, adv_k, loss_kind=kind.id, inv_temperature=inv_temperature, **params)
    for name, actual, want, scale in zip(("logp", "lse", "loss", "dlogp"), outputs, expected, value_scales,
                                         strict=False):
        assert actual.dtype == torch.float32
        assert_close_rel(actual, want, VALUE_TOL * tol_scale, f"forward {name} ({kind.name})", scale=scale)

    row_grad = outputs[3] * row_scale
    back = grad_buffer(rows3d)
    K.backward(rows3d, labels, outputs[1], row_grad, back, inv_temperature=inv_temperature)
    assert_close_rel(back.reshape(rows, -1), expected[4], grad_tol, f"backward dlogits ({kind.name})",
                     scale=grad_scale)

    out3d = grad_buffer(rows3d) if out3d is None else out3d
    fused = K.forward_grad(rows3d, labels, aux_k, adv_k, out3d, torch.tensor(row_scale, device=rows3d.device),
                           loss_kind=kind.id, inv_temperature=inv_temperature, **params)
    for name, actual, want, scale in zip(("logp", "lse", "loss", "dlogp"), fused, expected, value_scales,
                                         strict=False):
        assert_close_rel(actual, want, VALUE_TOL * tol_scale, f"forward_grad {name} ({kind.name})", scale=scale)
    assert_close_rel(out3d.reshape(rows, -1), expected[4], grad_tol, f"forward_grad dlogits ({kind.name})",
                     scale=grad_scale)
    not_counted = (labels < 0).nonzero()[:, 0]
    assert torch.equal(out3d.reshape(rows, -1)[not_counted], torch.zeros_like(out3d.reshape(rows, -1)[not_counted]))
    if out3d.data_ptr() != rows3d.data_ptr():
        same = (rows3d == pristine) | (rows3d.isnan() & pristine.isnan())
        assert same.all(), "the logits must not be written"
    return outputs, fused, out3d


def _labels(rows, vocab, not_counted=()):
    labels = torch.randint(0, vocab, (rows,), dtype=torch.int32)
    labels[list(not_counted)] = -1
    return labels


def test_rows_in_flight_of_the_persistent_kernel():
    """On an H100 (132 SMs, 50 MB L2; 25 MB for rows in flight): two 512-thread CTAs per SM where the rows allow
    (260 of GPT-J's 100.8 KB bf16 rows), one 1,024-thread CTA per SM at most, fewer programs than SMs where the
    rows do not stay in L2, never more than the SMs hold (at 64 registers a thread) or than there are rows."""
    assert UNPATCHED_GRAD_PROGRAMS(16384, 50400 * 2, 16) == 260
    assert UNPATCHED_GRAD_PROGRAMS(16384, 50400 * 2, 32) == 132
    assert UNPATCHED_GRAD_PROGRAMS(16384, 151936 * 4, 32) == 43  # 607.7 KB rows: 43 stay in 25 MB
    assert UNPATCHED_GRAD_PROGRAMS(16384, 4096 * 2, 8) == 132 * 4  # small rows: as many as the SMs hold
    assert UNPATCHED_GRAD_PROGRAMS(5, 50400 * 2, 32) == 5


# The issue's vocabularies: (V, bytes per logit) -> (training mode under `auto`, BLOCK_V, programs) on an H100.
DESIGNS = {
    (32000, 2): (True, 8192, 264), (32000, 4): (True, 8192, 204), (32001, 2): (True, 8192, 264),
    (50257, 2): (True, 8192, 260), (50400, 2): (True, 8192, 260), (50400, 4): (True, 16384, 130),
    (128256, 2): (True, 16384, 102), (128257, 2): (True, 16384, 102), (128256, 4): (False, 16384, 51),
    (151936, 2): (False, 16384, 86), (151936, 4): (False, 16384, 43), (256000, 2): (False, 16384, 51),
}


@pytest.mark.parametrize("vocab, itemsize", sorted(DESIGNS))
def test_design_by_the_byte_model(monkeypatch, vocab, itemsize):
    """Issue 21 item 2 on an H100: training mode where its rows in flight stay in half the L2 on at least 2/3 of
    the SMs, two kernels elsewhere; either way no launch moves more than 3L (training mode 2L: its rows in flight,
    forced with APA_FAST_FUSED_GRAD=1 too, stay within the budget)."""
    monkeypatch.undo()  # the real block caps and grid (`small_blocks` lowers them)
    d = K.design(16384, vocab, itemsize)
    assert (d.training_mode, d.block_v, d.programs) == DESIGNS[vocab, itemsize]
    assert d.rows_in_flight_bytes <= K.L2_BUDGET * K.DEFAULT_L2_BYTES and d.training_mode_bytes == 2
    assert d.ctas_per_sm <= (2 if d.block_v == K.MAX_GRAD_BLOCK_V // 2 else 1)
    assert d.training_mode == (d.programs >= K.MIN_SM_SHARE * K.DEFAULT_SMS)


def test_design_follows_the_device(monkeypatch):
    """The device's SMs and L2 move the line: an A100 (108 SMs, 40 MB) keeps two CTAs per SM at 50,400 bf16 (208
    rows stay in 20 MB) and runs two kernels at 151,936 (69 rows, under 72 SMs); a quarter of an H100's L2 leaves
    130 of its 132 SMs streaming at 50,400 (one CTA each); a row larger than the budget alone is 3L even forced."""
    monkeypatch.undo()
    a100 = {"sms": 108, "l2_bytes": 40 * 2**20}
    assert (K.design(16384, 50400, 2, **a100).block_v, K.design(16384, 50400, 2, **a100).programs) == (8192, 208)
    assert not K.design(16384, 151936, 2, **a100).training_mode
    small = K.design(16384, 50400, 2, l2_bytes=25 * 2**20)
    assert (small.training_mode, small.block_v, small.programs, small.ctas_per_sm) == (True, 16384, 130, 1)
    huge = K.design(64, 8 * 2**20, 4)  # a 32 MiB row
    assert huge.programs == 1 and huge.training_mode_bytes == 3 and not huge.training_mode


@pytest.mark.parametrize("mode, vocab, backend, wanted", [
    ("auto", 50400, "triton", True), ("auto", 151936, "triton", False), ("auto", 151936, "torch", True),
    ("1", 151936, "triton", True), ("0", 50400, "triton", False), ("0", 50400, "torch", False)])
def test_fused_grad_auto_is_the_byte_model(monkeypatch, mode, vocab, backend, wanted):
    """APA_FAST_FUSED_GRAD=auto is the byte model's choice on Triton (the defaults stand in for a GPU here),
    training mode on the torch backend at any V; 0 and 1 override it."""
    from apa_fast.logprob import fused_grad_wanted

    monkeypatch.setenv("APA_FAST_FUSED_GRAD", mode)
    assert fused_grad_wanted(backend, torch.empty(4, vocab, dtype=torch.bfloat16, device="meta")) is wanted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_every_kind_and_dtype_against_float64(kind, dtype):
    """(2, 3) rows x 150 columns: three blocks, the last one partial; one row does not count."""
    rows3d = (torch.randn(2, 3, 150) * 3).to(dtype)
    _check_all_passes(rows3d, _labels(6, 150, not_counted=[4]), kind)


def test_logprob_kind_stores_logp_as_its_loss():
    rows3d = torch.randn(1, 3, 70)
    logp, _, loss, dlogp = K.forward(rows3d, _labels(3, 70, [1]), torch.empty(0), torch.empty(0),
                                     loss_kind=LOGPROB.id, inv_temperature=1.0)
    assert torch.equal(loss, logp) and torch.equal(dlogp, torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("vocab", [1, 5, 64, 65, 129, 200])
def test_vocab_sizes_one_block_partial_and_several(vocab):
    """One column, less than a block, exactly a block, one past, several blocks; a single row too."""
    kind = KINDS[1]
    _check_all_passes(torch.randn(1, 1, vocab) * 2, _labels(1, vocab), kind)
    _check_all_passes(torch.randn(1, 3, vocab) * 2, _labels(3, vocab, [0]), kind)


def test_rows_that_do_not_count_read_nothing():
    """NaN logits in rows that do not count: their outputs and gradient rows are exact zeros."""
    rows3d = torch.randn(1, 4, 100)
    rows3d[0, 1] = float("nan")
    rows3d[0, 3, :7] = float("inf")
    labels = _labels(4, 100, [1, 3])
    for kind in KINDS:
        outputs, fused, out3d = _check_all_passes(rows3d, labels, kind)
        for values in (*outputs, *fused):
            assert torch.equal(values[[1, 3]], torch.zeros(2))
        labels_none = torch.full((4,), -1, dtype=torch.int32)
        K.forward_grad(rows3d, labels_none, *_token_data(kind, 4)[2:], out3d, torch.tensor(1.0),
                       loss_kind=kind.id, inv_temperature=1.0)
        assert torch.equal(out3d, torch.zeros_like(out3d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_layouts_and_strided_gradient(dtype):
    """``logits[:, :-1]`` of (B, T, V); a transposed (T, B) view; a vocabulary stride of 2; strided out3d."""
    kind = KINDS[2]
    full = (torch.randn(3, 4, 90) * 2).to(dtype)
    sliced = full[:, :-1]  # outer stride 4 * 90, inner stride 90: not mergeable
    _check_all_passes(sliced, _labels(9, 90, [2]), kind)
    transposed = full.transpose(0, 1)  # (4, 3, 90): inner stride > outer stride
    _check_all_passes(transposed, _labels(12, 90, [0, 5]), kind)
    every_other = full[..., ::2]  # stride_v = 2
    out3d = torch.zeros(3, 4, 45 * 3, dtype=dtype)[..., 1::3]  # a strided gradient buffer
    _check_all_passes(every_other, _labels(12, 45), kind, out3d=out3d)


def _misaligned_rows():
    """(name, rows3d, labels) whose rows start at every offset from a 16-byte boundary (odd V, odd strides)."""
    full = torch.randn(2, 5, 133) * 3  # 133 = 5 mod 8: consecutive rows start 5 columns further from a boundary
    yield "logits[:, :-1] of (2, 5, 133)", full[:, :-1], _labels(8, 133, [3])
    yield "row stride 75, V 70", (torch.randn(1, 7, 75) * 3)[..., 2:72], _labels(7, 70, [0])
    yield "V 5: shorter than a vector", torch.randn(1, 6, 5) * 3, _labels(6, 5, [1])
    yield "one token, 3 columns past a boundary", (torch.randn(200) * 3)[3:136].view(1, 1, 133), _labels(1, 133)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entropy", [False, True], ids=["entropy_off", "entropy_on"])
def test_rows_at_every_offset_from_a_16_byte_boundary(dtype, entropy):
    """Each row's peeled head, aligned body and tail: every row offset from a 16-byte boundary (a sliced odd-V
    view, a row stride not a multiple of 8, a row shorter than one vector, one token at an unaligned address),
    with the gradient where the ops put it (`gradient_buffer`: aligned stores), in a contiguous buffer (rows at
    other offsets: scalar stores) and, entropy off, in place (the entropy check reads the logits after the
    training-mode pass); the forward, backward and training-mode passes, entropy off and on."""
    for _, rows3d, labels in _misaligned_rows():
        rows3d = rows3d.to(dtype)
        for grad_buffer in (gradient_buffer, lambda x: torch.empty(x.shape, dtype=x.dtype)):
            if entropy:
                _check_passes_with_entropy(K, rows3d, labels, out3d=grad_buffer(rows3d))
            else:
                _check_all_passes(rows3d, labels, APA, grad_buffer=grad_buffer)
        if not entropy:
            in_place = rows3d.clone()
            _check_all_passes(in_place, labels, APA, out3d=in_place)


@triton.jit
def _row_parts_kernel(base_ptr, out_ptr, vocab, VEC: tl.constexpr):
    head, body = K._row_parts(base_ptr, vocab, VEC)
    tl.store(out_ptr, head)
    tl.store(out_ptr + 1, body)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_body_starts_at_a_16_byte_boundary(dtype):
    """`_row_parts` at every offset: the body starts 16-byte aligned (a misaligned vector access faults on a GPU,
    which the interpreter does not check), holds whole vectors, and leaves a head and a tail shorter than one."""
    vec = 16 // dtype.itemsize
    storage = torch.empty(64, dtype=dtype)
    out = torch.empty(2, dtype=torch.int32)
    for offset in range(vec):
        for vocab in (1, vec - 1, vec, 3 * vec + 5, 133):
            row = storage[offset:offset + vocab]
            _row_parts_kernel[(1,)](row, out, vocab, vec)
            head, body = out.tolist()
            assert 0 <= head < vec and body % vec == 0 and 0 <= vocab - head - body < vec, (offset, vocab)
            if head < vocab:
                assert (row.data_ptr() + head * dtype.itemsize) % 16 == 0, (offset, vocab)
            assert body == (vocab - head) // vec * vec, (offset, vocab)


def test_gradient_vector_width_follows_the_buffer_alignment():
    """`_grad_vector`: the body's stores are vectors only where each gradient row starts at its logits row's
    offset from a 16-byte boundary (in place, `gradient_buffer`); 1 for a contiguous buffer under an odd-V slice
    and for strided rows."""
    sliced = torch.empty(2, 5, 133, dtype=torch.bfloat16)[:, :-1]
    assert K._vector(sliced) == 8 and K._vector(sliced.float()) == 4
    assert K._grad_vector(sliced, sliced) == 8 and K._grad_vector(sliced, gradient_buffer(sliced)) == 8
    assert K._grad_vector(sliced, torch.empty(sliced.shape, dtype=sliced.dtype)) == 1
    aligned = torch.empty(2, 5, 136, dtype=torch.bfloat16)[:, :-1]  # V a multiple of 8: any buffer lines up
    assert K._grad_vector(aligned, torch.empty(aligned.shape, dtype=aligned.dtype)) == 8
    strided = torch.empty(2, 4, 90)[..., ::2]
    assert K._vector(strided) == 1 and K._grad_vector(strided, gradient_buffer(strided)) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_grad_in_place(dtype):
    """out3d = rows3d: the gradient overwrites the logits it was computed from, row by row."""
    for kind in KINDS:
        rows3d = (torch.randn(2, 2, 130) * 2).to(dtype)
        labels = _labels(4, 130, [3])
        aux, adv, aux_k, adv_k = _token_data(kind, 4)
        expected = _reference(rows3d, labels, aux, adv, kind, 0.7, 0.25)
        params = dict(zip(("param0", "param1"), _params(kind), strict=True))
        fused = K.forward_grad(rows3d, labels, aux_k, adv_k, rows3d, torch.tensor(0.25), loss_kind=kind.id,
                               inv_temperature=0.7, **params)
        assert_close_rel(fused[2], expected[2], VALUE_TOL, f"in-place loss ({kind.name})")
        assert_close_rel(rows3d.reshape(4, -1), expected[4], _grad_tol(expected[4], dtype),
                         f"in-place dlogits ({kind.name})")


def test_issue13_leading_block_of_minus_inf(monkeypatch):
    """The issue's reproducer at the real block size: 5000 columns, the first 4096 (one block) are -inf."""
    monkeypatch.setattr(K, "MAX_BLOCK_V", 4096)
    monkeypatch.setattr(K, "MAX_GRAD_BLOCK_V", 4096)
    x = torch.randn(1, 1, 5000)
    x[..., :4096] = float("-inf")
    _check_all_passes(x, torch.tensor([4500], dtype=torch.int32), LOGPROB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_blocks_lanes_and_labels(dtype):
    """-inf over whole blocks, over one lane of every block, every other column, and at the label."""
    vocab = 200  # blocks of 64: 0-63, 64-127, 128-191, 192-199 (partial)
    x = (torch.randn(1, 6, vocab) * 2).to(dtype)
    x[0, 0, :128] = float("-inf")  # two leading blocks
    x[0, 1, 5::64] = float("-inf")  # lane 5 of every block
    x[0, 2, ::2] = float("-inf")  # every other column
    x[0, 3, 64:] = float("-inf")  # everything after the first block, the partial block too
    x[0, 4, :199] = float("-inf")  # a single finite column, in the partial block
    labels = torch.tensor([150, 64, 7, 3, 199, 10], dtype=torch.int32)
    for kind in KINDS:
        _check_all_passes(x, labels, kind)
    # The label itself masked: logp is -inf, exactly as the torch backend (and float64) give it.
    x[0, 5, 10] = float("-inf")
    logp, lse, _, _ = K.forward(x, labels, torch.empty(0), torch.empty(0), loss_kind=LOGPROB.id,
                                inv_temperature=1.0)
    assert logp[5] == float("-inf") and torch.isfinite(lse).all()
    assert torch.isfinite(logp[:5]).all()


@pytest.mark.parametrize("temperature", [1e-6, 1e-3, 1e3, 1e6])
def test_extreme_temperatures_stay_finite(temperature):
    """The host accepts T in [1e-6, 1e6]: partial blocks (padded lanes) and -inf columns at both ends."""
    x = torch.randn(1, 3, 100) * 2
    x[0, 1, :64] = float("-inf")
    labels = _labels(3, 100, [2])
    labels[1] = 80
    # float32 resolves exp(x / T - lse) only to about eps32 * |x / T| relative (torch's float32 path as well).
    conditioning = max(1.0, x[x.isfinite()].abs().max().item() / temperature / 100)
    for kind in KINDS:
        outputs, fused, grad = _check_all_passes(x, labels, kind, inv_temperature=1.0 / temperature,
                                                 tol_scale=conditioning)
        assert all(torch.isfinite(t).all() for t in (*outputs, *fused, grad))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0 (the compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab", [50400, 50257])
def test_compiled_kernels_on_gpu(dtype, vocab):
    """The compiled code (vector loads, the persistent grid with several rows per program, the label fix-up
    after its barrier) on ``logits[:, :-1]`` with -inf blocks and lanes, rows that do not count, in place.
    Every kind in bf16, APA in the other dtypes (each variant is a compile: the GPU script's time is short)."""
    rows3d = (torch.randn(4, 100, vocab, device="cuda") * 3).to(dtype)[:, :-1]
    rows3d[0, 0, :min(4096, vocab // 2)] = float("-inf")  # a whole leading block where V allows
    rows3d[0, 1, 5::64] = float("-inf")
    labels = _labels(396, vocab, not_counted=range(7, 396, 11)).cuda()
    labels[:2] = torch.tensor([vocab - 1, 6])  # finite logits at the labels of the two rows with -inf
    for kind in KINDS if dtype == torch.bfloat16 else (APA,):
        _check_all_passes(rows3d, labels, kind, inv_temperature=1.25)
    in_place = rows3d.clone()
    _check_all_passes(in_place, labels, APA, out3d=in_place)

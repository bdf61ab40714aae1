"""apa_fast.loss / logprobs / ppo_loss / awr_loss against a float64 oracle, on both backends and both
gradient designs (two kernels; training mode). Tolerances per dtype: see tests/oracles.py.

For bf16/fp16 the fused result must also be at most `LOW_PRECISION_FACTOR` times the error of the unfused
float32-accumulating PyTorch computation (`apa_fast.reference`) on the same low-precision inputs.
"""

import pytest
import torch
from conftest import assert_close_rel, rel_err
from oracles import IGNORE, KINDS, check, float32_floor, make_inputs, oracle, run_fused

import apa_fast
from apa_fast import _dispatch, rows, torch_backend
from apa_fast import logprob as loss_module

# On CPU tensors the Triton kernels run only under the interpreter (conftest sets it unless the caller chose
# TRITON_INTERPRET=0, as the GPU script does; the GPU versions of these checks are in test_logprob_cuda.py).
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                                    reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")),
    "torch",
]
LOW_PRECISION_FACTOR = 2.0


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"], autouse=True)
def gradient_design(request, monkeypatch):
    """Every test runs with both designs of the gradient (APA_FAST_FUSED_GRAD), where the backend has both."""
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------
# Values and gradients against float64.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_loss_and_reduction(backend, kind, reduction):
    inputs = make_inputs((3, 7), 1003)  # 1003: not a multiple of any block size
    check(kind, backend, *inputs, reduction=reduction, temperature=0.7, lam=0.5, what=f"{kind}/{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rows_shape, vocab",
    [
        ((3,), 50400),  # GPT-J's vocabulary: 13 blocks of 4096, the last one partial
        ((2, 5), 4097),  # one element past a power of two
        ((7,), 3),  # a vocabulary of 3
        ((1,), 517),  # one row
        ((1, 1), 1),  # one token, one-word vocabulary: log-prob exactly 0
        ((2, 2, 3), 129),  # three leading dimensions
    ],
)
def test_shapes(backend, rows_shape, vocab):
    inputs = make_inputs(rows_shape, vocab)
    check("apa", backend, *inputs, lam=0.1, what=f"{rows_shape}x{vocab}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gptj_vocab_logprobs(backend):
    logits, labels, *_ = make_inputs((4,), 50400, ignore_frac=0.0)
    got = apa_fast.logprobs(logits, labels, backend=backend)
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
    assert_close_rel(got, want, 2e-5, "logprobs at V=50400")
    assert (got < 0).all(), "log-probabilities of a 50400-way softmax must be negative"


def _strided_views():
    base = torch.randn(2, 9, 300) * 2
    yield "time slice [:, :-1]", base[:, :-1]
    yield "vocab stride 2", torch.randn(2, 4, 600)[..., ::2]
    yield "transposed leading dims", torch.randn(5, 3, 211).transpose(0, 1)
    yield "non-mergeable 3-D leading slice", torch.randn(2, 3, 4, 97)[:, :, 1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, logits", list(_strided_views()), ids=lambda v: v if isinstance(v, str) else "")
def test_strided_logits(backend, name, logits):
    _, labels, aux, adv, mask, weights = make_inputs(logits.shape[:-1], logits.shape[-1])
    check("apa", backend, logits, labels, aux, adv, mask, weights, temperature=1.3, what=name)


def test_time_slice_is_not_copied():
    base = torch.randn(2, 9, 300)
    rows3d = rows.as_rows3d(base[:, :-1])
    assert rows3d.data_ptr() == base.data_ptr() and rows3d.shape == (2, 8, 300)
    merged = rows.as_rows3d(base[:, 3:5].unsqueeze(0))
    assert merged.data_ptr() == base[:, 3:5].data_ptr() and merged.shape == (2, 2, 300)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["apa", "ppo", "awr"])
def test_nothing_counts(backend, kind):
    logits, labels, aux, adv, mask, weights = make_inputs((2, 6), 257)
    mask = torch.zeros_like(mask)
    for reduction in ("mean", "sum"):
        value, grad = run_fused(kind, backend, logits, labels, aux, adv, mask, reduction=reduction)
        assert value.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
    labels = torch.full_like(labels, IGNORE)
    value, grad = run_fused("logprobs", backend, logits, labels, aux, adv, None, weights=weights)
    assert torch.equal(value, torch.zeros_like(value)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_do_not_count_get_exact_zero_gradients(backend):
    logits, labels, aux, adv, mask, weights = make_inputs((4, 5), 333, ignore_frac=0.3, mask_frac=0.3)
    logits[~mask] = 1e4  # huge logits on rows that do not count must not leak NaN/inf into anything
    _, grad = run_fused("apa", backend, logits, labels, aux, adv, mask)
    skipped = ~mask | (labels == IGNORE)
    assert skipped.any() and (~skipped).any()
    assert torch.equal(grad[skipped], torch.zeros_like(grad[skipped]))
    assert (grad[~skipped] != 0).any(dim=-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["apa", "logprobs"])
def test_low_precision_is_as_accurate_as_float32_torch(backend, dtype, kind):
    logits, labels, aux, adv, mask, weights = make_inputs((4, 6), 2011, dtype=dtype)
    mask_arg = None if kind == "logprobs" else mask
    got_value, got_grad, want_value, want_grad = check(kind, backend, logits, labels, aux, adv, mask, weights,
                                                       lam=0.5, what=str(dtype))
    # The unfused PyTorch path on the same low-precision values, accumulating in float32.
    x = logits.float().requires_grad_()
    if kind == "logprobs":
        torch_value = apa_fast.reference.logprobs(x, labels, ignore_index=IGNORE)
        (torch_value * weights).sum().backward()
    else:
        torch_value = apa_fast.reference.apa_loss(x, labels, aux, adv, mask_arg, lam=0.5, ignore_index=IGNORE)
        torch_value.backward()
    floor_value = 1e-7 * want_value.norm().item() + 1e-12
    assert rel_err(got_value, want_value) <= LOW_PRECISION_FACTOR * rel_err(torch_value, want_value) + floor_value
    # Its float32 gradient stored in `dtype` with the rounding the kernel's store uses: to nearest even, as
    # on a GPU and in torch; Triton's interpreter truncates float32 -> bfloat16 (its cast passes no rounding
    # mode), so on CPU test runs the comparison truncates too.
    if backend == "triton" and dtype == torch.bfloat16 and _dispatch.interpreter_enabled():
        torch_grad = (x.grad.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits zero
    else:
        torch_grad = x.grad.to(dtype)
    assert rel_err(got_grad, want_grad) <= LOW_PRECISION_FACTOR * rel_err(torch_grad, want_grad) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_overwrites_logits_with_gradient(backend):
    logits, labels, aux, adv, mask, weights = make_inputs((3, 4), 1001)
    _, want_grad = oracle("apa", logits, labels, aux, adv, mask)
    leaf = logits.clone().requires_grad_()
    buffer = leaf.clone()  # a non-leaf, as a model's logits (a leaf's memory is never overwritten)
    apa_fast.loss(buffer, labels, aux, adv, mask, ignore_index=IGNORE, backend=backend,
                  inplace_backward=True).backward()
    assert leaf.grad.data_ptr() == buffer.data_ptr()
    # Every element of the (random, non-zero) buffer was rewritten, rows that do not count with zeros.
    assert_close_rel(buffer.detach(), want_grad, 2e-5, "in-place gradient")


@pytest.mark.skipif(not _dispatch.interpreter_enabled(), reason="TRITON_INTERPRET=0")
def test_backends_agree_on_unseen_inputs():
    """Fresh shapes drawn at random each run: the two backends and the oracle agree."""
    rows_shape = tuple(int(n) for n in torch.randint(1, 6, (2,)))
    vocab = int(torch.randint(2, 6000, ()))
    inputs = make_inputs(rows_shape, vocab)
    triton_value, triton_grad, want_value, want_grad = check("apa", "triton", *inputs, temperature=0.9, what="triton")
    torch_value, torch_grad, *_ = check("apa", "torch", *inputs, temperature=0.9, what="torch")
    # Each backend may sit on either side of the float64 answer by up to the float32 floor.
    logits, labels, aux, adv, mask, weights = inputs
    floor_value, floor_grad = float32_floor("apa", logits, labels, aux, adv, mask, want_value, want_grad,
                                            weights=weights, temperature=0.9)
    assert_close_rel(triton_value, torch_value, 2e-5, "triton vs torch value", scale=2 * floor_value / 2e-5)
    assert_close_rel(triton_grad, torch_grad, 2e-5, "triton vs torch grad", scale=2 * floor_grad / 2e-5)


def test_reference_matches_oracle():
    logits, labels, aux, adv, mask, _ = make_inputs((3, 5), 777)
    for kind, ref in [("apa", apa_fast.reference.apa_loss), ("ppo", apa_fast.reference.ppo_loss)]:
        want, _ = oracle(kind, logits, labels, aux, adv, mask)
        assert_close_rel(ref(logits, labels, aux, adv, mask, ignore_index=IGNORE), want, 2e-5, kind)
    want, _ = oracle("awr", logits, labels, aux, adv, mask)
    got = apa_fast.reference.awr_loss(logits, labels, adv, mask, ignore_index=IGNORE)
    assert_close_rel(got, want, 2e-5, "awr")


# ----------------------------------------------------------------------------------------------------
# Memory: the torch backend never holds a float32 [rows x vocab] tensor.
# ----------------------------------------------------------------------------------------------------
class LargestFloatOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest float32 tensor any op allocates while active (views are not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # no new memory
            return out
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_torch_backend_works_in_chunks(monkeypatch, gradient_design):
    monkeypatch.setattr(torch_backend, "TORCH_CHUNK_BYTES", 64 * 1024)
    largest = LargestFloatOutput()
    # The ops run inside custom ops, which a dispatch mode sees as one call: watch the backend's own functions.
    for name in ("forward", "backward", "forward_grad"):
        original = getattr(torch_backend, name)

        def watched(*args, _original=original, **kwargs):
            with largest:
                return _original(*args, **kwargs)

        monkeypatch.setattr(torch_backend, name, watched)
    rows, vocab = 64, 1000
    logits, labels, aux, adv, mask, _ = make_inputs((rows,), vocab, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    apa_fast.loss(x, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch").backward()
    assert 0 < largest.largest <= 64 * 1024 // 4
    with LargestFloatOutput() as unfused_mode:
        apa_fast.reference.apa_loss(logits.clone().requires_grad_(), labels, aux, adv, mask).backward()
    assert unfused_mode.largest >= rows * vocab  # the check above can fail: the unfused path does it


# ----------------------------------------------------------------------------------------------------
# Errors: raised before any kernel runs, naming the argument.
# ----------------------------------------------------------------------------------------------------
def _good():
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    mask[0, 0] = True  # labels are range-checked where counted only: all 6 hidden (0.25**6 = 2e-4 of seeds) hid them
    return dict(logits=logits, labels=labels, ref_logprobs=aux, advantages=adv, mask=mask)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(lam=0.0), ValueError, "lam"),
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(lam=float("nan")), ValueError, "lam"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(ref_logprobs=torch.randn(3, 2)), ValueError, r"ref_logprobs must have the token .*\(3, 2\)"),
        (dict(ref_logprobs=torch.randn(3)), ValueError, "ref_logprobs must have the token shape"),
        (dict(ref_logprobs=torch.randn(())), ValueError, "ref_logprobs must have the token shape"),
        (dict(advantages=torch.randn(2, 3, 1)), ValueError, "advantages must have the token shape"),
        (dict(advantages=torch.randn(1, 3)), ValueError, "advantages must have the token shape"),
        (dict(lam=True), ValueError, "lam must be a real number"),
        (dict(temperature=1e-39), ValueError, r"temperature must be in \[1e-06, 1e\+06\]"),
        (dict(temperature=1e46), ValueError, "temperature must be in"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(labels=torch.rand(2, 3)), TypeError, "labels must be an integer"),
        (dict(labels=torch.ones(2, 3, dtype=torch.bool)), TypeError, "labels must be an integer"),
        (dict(labels=torch.full((2, 3), 11)), ValueError, r"labels must be in \[0, 11\).*found 11"),
        (dict(labels=torch.full((2, 3), -5)), ValueError, "found -5"),
        (dict(ref_logprobs=torch.ones(2, 3, dtype=torch.long)), TypeError, "ref_logprobs must be a floating"),
        (dict(mask=torch.rand(2, 3) + 0.1), ValueError, "mask must hold only 0/1"),
        (dict(mask=torch.full((2, 3), 2)), ValueError, "mask must hold only 0/1.*found 2"),
        (dict(mask=torch.full((2, 3), float("nan"))), ValueError, "mask must hold only 0/1"),
        (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must be a bool, integer or float"),
        (dict(labels=torch.ones(2, 3, dtype=torch.uint16)), TypeError, "labels must be an integer tensor"),
        (dict(logits=torch.randn(2, 3, 11).double()), TypeError, "logits must be float32"),
        (dict(logits=torch.randint(0, 5, (2, 3, 11))), TypeError, "logits must be float32"),
        (dict(logits=torch.randn(2, 3, 0)), ValueError, "V >= 1"),
        (dict(advantages=torch.randn(2, 3, device="meta")), ValueError, "advantages is on meta"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.long, device="meta")), ValueError, "labels is on meta"),
        (dict(logits=[[1.0]]), TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_errors(change, error, match):
    args, change = _good(), dict(change)
    kwargs = {k: change.pop(k) for k in list(change) if k in ("lam", "temperature", "reduction", "backend")}
    args.update(change)
    with pytest.raises(error, match=match):
        apa_fast.loss(**args, **kwargs)


def test_other_ops_check_their_parameters():
    args = _good()
    with pytest.raises(ValueError, match="clip_eps"):
        apa_fast.ppo_loss(args["logits"], args["labels"], args["ref_logprobs"], args["advantages"], clip_eps=0)
    with pytest.raises(ValueError, match="max_weight"):
        apa_fast.awr_loss(args["logits"], args["labels"], args["advantages"], max_weight=-1.0)
    with pytest.raises(ValueError, match="old_logprobs must have the token shape"):
        apa_fast.ppo_loss(args["logits"], args["labels"], torch.randn(5), args["advantages"])
    with pytest.raises(ValueError, match="labels must be in"):
        apa_fast.logprobs(args["logits"], torch.full((2, 3), 99))


# ----------------------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------------------
def test_auto_picks_triton_on_cuda_and_torch_on_cpu():
    assert _dispatch.pick_loss_backend("auto", torch.device("cpu")) == "torch"
    assert _dispatch.pick_loss_backend("auto", torch.device("cuda", 0)) == "triton"
    assert _dispatch.pick_loss_backend("torch", torch.device("cuda", 0)) == "torch"


def test_auto_runs_the_torch_path_on_cpu(monkeypatch):
    picked = []
    original = loss_module.implementation
    monkeypatch.setattr(loss_module, "implementation", lambda b: picked.append(b) or original(b))
    apa_fast.loss(**_good(), backend="auto")
    assert set(picked) == {"torch"}


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        apa_fast.loss(**_good(), backend="triton")
    assert _dispatch.pick_loss_backend("auto", torch.device("cpu")) == "torch"


def test_missing_triton_is_explained(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_status", lambda: (False, "triton is not importable (test)"))
    with pytest.raises(RuntimeError, match="triton is not importable"):
        _dispatch.pick_loss_backend("triton", torch.device("cuda", 0))
    assert _dispatch.pick_loss_backend("auto", torch.device("cuda", 0)) == "torch"


def test_module_wrappers():
    args = _good()
    module = apa_fast.APALoss(lam=0.3, temperature=0.8, backend="torch")
    want = apa_fast.loss(*args.values(), lam=0.3, temperature=0.8, backend="torch")
    assert torch.equal(module(*args.values()), want)
    assert "lam=0.3" in repr(module)


def test_training_mode_backward_allocates_nothing_logits_sized(monkeypatch):
    """The gradient was written in the forward: loss.backward() hands it over, with no logits-sized buffer
    (not even autograd's zeros for the op's gradient output)."""
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", "1")
    rows, vocab = 64, 1000
    logits, labels, aux, adv, mask, _ = make_inputs((rows,), vocab)
    x = logits.clone().requires_grad_()
    value = apa_fast.loss(x, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch")
    with LargestFloatOutput() as backward_mode:
        value.backward()
    assert backward_mode.largest < rows * vocab
    with LargestFloatOutput() as scaled_mode:  # the check above can fail: a rescale needs a new buffer
        apa_fast.loss(x, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch").mul(3.0).backward()
    assert scaled_mode.largest >= rows * vocab

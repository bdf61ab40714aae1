"""GPU checks of the fused log-prob kernels (compiled Triton, not the interpreter), in both gradient designs.
Skipped without CUDA.

Run on a GPU machine with TRITON_INTERPRET=0 (benchmarks/gpu_run.sh does): `pytest -m cuda tests/`.
"""

import pytest
import torch
from conftest import assert_close_rel
from oracles import IGNORE, KINDS, TOLERANCES, make_inputs, oracle, run_fused

import apa_fast

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(params=["0", "1"], ids=["two-kernel", "training-mode"], autouse=True)
def gradient_design(request, monkeypatch):
    """Both designs of the gradient (APA_FAST_FUSED_GRAD) on the compiled kernels."""
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", request.param)
    return request.param


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows_shape, vocab", [((4, 33), 50400), ((3, 17), 151936), ((5,), 3), ((1,), 4097)])
def test_kernels_match_float64_on_gpu(dtype, kind, rows_shape, vocab):
    logits, labels, aux, adv, mask, weights = _cuda(*make_inputs(rows_shape, vocab, dtype=dtype))
    mask = None if kind == "logprobs" else mask
    value_tol, grad_tol = TOLERANCES[dtype]
    want_value, want_grad = oracle(kind, logits, labels, aux, adv, mask, weights=weights, temperature=0.8)
    got_value, got_grad = run_fused(kind, "triton", logits, labels, aux, adv, mask, weights=weights,
                                    temperature=0.8)
    assert_close_rel(got_value, want_value, value_tol, "value")
    assert_close_rel(got_grad, want_grad, grad_tol, "grad")


def test_auto_picks_triton_on_cuda(monkeypatch):
    from apa_fast import logprob

    picked = []
    original = logprob._implementation
    monkeypatch.setattr(logprob, "_implementation", lambda b: picked.append(b) or original(b))
    logits, labels, aux, adv, mask, _ = _cuda(*make_inputs((2, 3), 1000))
    apa_fast.loss(logits, labels, aux, adv, mask)
    assert picked == ["triton"]


def test_more_rows_than_a_grid_axis_limit():
    rows, vocab = 70_000, 40  # > 65,535 rows: rows must be on the first grid axis
    logits = torch.randn(rows, vocab, device="cuda")
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    got = apa_fast.logprobs(logits, labels, backend="triton")
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
    assert_close_rel(got, want, 2e-5, "70k rows")


def test_offsets_beyond_2_31_elements():
    vocab = 50400
    rows = 2**31 // vocab + 8  # rows x V > 2**31 elements: 64-bit offsets needed (4.3 GB in bf16)
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.full((rows,), -100, device="cuda")
    tail = slice(rows - 16, rows)
    labels[tail] = torch.randint(0, vocab, (16,), device="cuda")
    x = logits.requires_grad_()
    logp = apa_fast.logprobs(x, labels, backend="triton")
    logp.sum().backward()
    want = torch.log_softmax(logits[tail].double(), -1).gather(-1, labels[tail, None])[:, 0]
    assert_close_rel(logp[tail], want, 2e-5, "tail rows")
    assert x.grad[tail].float().abs().sum() > 0 and x.grad[: rows - 16].abs().max() == 0


@pytest.mark.parametrize("inplace", [False, True])
def test_no_float32_rows_x_vocab_buffer(inplace):
    rows, vocab = 4096, 50400
    logits, labels, aux, adv, mask, _ = _cuda(*make_inputs((rows,), vocab, dtype=torch.bfloat16))
    # A non-leaf, as a model's logits (inplace_backward never overwrites a leaf); the add saves no tensor.
    x = logits + torch.zeros((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    del logits
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = apa_fast.loss(x, labels, aux, adv, mask, backend="triton", inplace_backward=inplace)
    forward_peak = torch.cuda.max_memory_allocated() - base
    loss.backward()
    total_peak = torch.cuda.max_memory_allocated() - base
    grad_bytes = rows * vocab * 2
    assert forward_peak < 1 << 20  # a few float32 per row
    assert total_peak <= (1 << 20) + (0 if inplace else grad_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["apa", "ppo", "awr"])
@pytest.mark.parametrize("rows_shape, vocab", [((4, 9), 50257), ((2, 5), 151936), ((3,), 4097)])
def test_entropy_bonus_matches_float64_on_gpu(dtype, kind, rows_shape, vocab):
    """entropy_coef and return_entropy on the compiled kernels, at odd vocabularies (peeled row loops)."""
    logits, labels, aux, adv, mask, _ = _cuda(*make_inputs(rows_shape, vocab, dtype=dtype))
    value_tol, grad_tol = TOLERANCES[dtype]
    want_value, want_entropy, want_grad = oracle(kind, logits, labels, aux, adv, mask, temperature=0.8,
                                                 entropy_coef=0.3, with_entropy=True)
    x = logits.detach().clone().requires_grad_()
    common = dict(temperature=0.8, ignore_index=IGNORE, entropy_coef=0.3, return_entropy=True, backend="triton")
    if kind == "apa":
        got_value, got_entropy = apa_fast.loss(x, labels, aux, adv, mask, **common)
    elif kind == "ppo":
        got_value, got_entropy = apa_fast.ppo_loss(x, labels, aux, adv, mask, **common)
    else:
        got_value, got_entropy = apa_fast.awr_loss(x, labels, adv, mask, **common)
    got_value.backward()
    assert_close_rel(got_value, want_value, value_tol, "value")
    assert_close_rel(got_entropy, want_entropy, 2e-5, "entropy")
    assert_close_rel(x.grad, want_grad, grad_tol, "grad")

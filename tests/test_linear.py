"""apa_fast.linear.linear_loss / linear_logprobs against a float64 oracle, on both backends.

Tolerances (relative L2 error against float64 on the same inputs):
- float32: 2e-5 for values and for the gradients of hidden, weight and bias (the float32 matmuls over
  H <= 64 and the float32 log-softmax each contribute ~1e-6);
- bfloat16/float16: the logits themselves are rounded to the inputs' dtype (as in ``hidden @ weight.T``),
  so the fused result must be at most `LOW_PRECISION_FACTOR` times the error of the materialised path
  (``apa_fast.loss(hidden @ weight.T + bias)`` in the same dtype, on the same backend: under Triton's
  interpreter both store bf16 gradients the interpreter's way) against float64.
"""

import pytest
import torch
from conftest import assert_close_rel, rel_err
from oracles import IGNORE, make_token_data

import apa_fast
from apa_fast import linear as linear_module
from apa_fast.linear import linear_logprobs, linear_loss

BACKENDS = ["triton", "torch"]
FLOAT32_TOL = 2e-5
# The weight gradient sums one rounded product per chunk where the materialised path rounds once.
LOW_PRECISION_FACTOR = 2.0


# ----------------------------------------------------------------------------------------------------
# The float64 oracle: autograd through torch.log_softmax on float64 copies.
# ----------------------------------------------------------------------------------------------------
def oracle(kind, hidden, weight, bias, labels, aux, adv, mask, *, lam=1.0, temperature=1.0, reduction="mean",
           weights=None):
    """(value, [d hidden, d weight, d bias]) in float64; ``weights`` make a per-token output a scalar."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.T + (0.0 if b is None else b)
    counted = labels != IGNORE
    if mask is not None:
        counted = counted & mask.bool()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp = logp_all.gather(-1, torch.where(counted, labels, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(counted, logp, 0.0)
    if kind == "logprobs":
        out = logp
    else:
        per_token = torch.where(counted, (logp - aux.double() - adv.double() / lam) ** 2, 0.0)
        out = {"none": per_token, "sum": per_token.sum(),
               "mean": per_token.sum() / counted.sum().clamp(min=1)}[reduction]
    (out if out.dim() == 0 else (out * weights.double()).sum()).backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def run_fused(kind, backend, hidden, weight, bias, labels, aux, adv, mask, *, lam=1.0, temperature=1.0,
              reduction="mean", weights=None, chunk_size=None, upstream=1.0):
    """(value, [d hidden, d weight, d bias]) of the library op; ``upstream`` scales the scalar objective."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    common = dict(bias=b, temperature=temperature, ignore_index=IGNORE, chunk_size=chunk_size, backend=backend)
    if kind == "logprobs":
        out = linear_logprobs(h, w, labels, **common)
    else:
        out = linear_loss(h, w, labels, aux, adv, mask, lam=lam, reduction=reduction, **common)
    (upstream * (out if out.dim() == 0 else (out * weights).sum())).backward()
    return out.detach(), [None if t is None else t.grad for t in leaves]


def make_inputs(rows_shape, hidden_size, vocab, *, dtype=torch.float32, bias=True, ignore_frac=0.15,
                mask_frac=0.25):
    """Hidden states, an lm_head (logits of a few units), labels with ignore_index, a mask with holes."""
    hidden = torch.randn(*rows_shape, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * 2.0 / hidden_size**0.5).to(dtype)
    bias_tensor = torch.randn(vocab).to(dtype) if bias else None
    labels, aux, adv, mask, weights = make_token_data(rows_shape, vocab, ignore_frac=ignore_frac,
                                                      mask_frac=mask_frac)
    return hidden, weight, bias_tensor, labels, aux, adv, mask, weights


def check(kind, backend, inputs, *, what, tol=FLOAT32_TOL, **kwargs):
    hidden, weight, bias, labels, aux, adv, mask, weights = inputs
    mask = None if kind == "logprobs" else mask
    want_value, want_grads = oracle(kind, hidden, weight, bias, labels, aux, adv, mask, weights=weights,
                                    **{k: v for k, v in kwargs.items() if k not in ("chunk_size", "upstream")})
    upstream = kwargs.get("upstream", 1.0)
    got_value, got_grads = run_fused(kind, backend, hidden, weight, bias, labels, aux, adv, mask, weights=weights,
                                     **kwargs)
    assert got_value.dtype == torch.float32
    assert_close_rel(got_value, want_value, tol, f"{what} value")
    inputs_and_grads = zip(("hidden", "weight", "bias"), got_grads, want_grads, (hidden, weight, bias), strict=True)
    for name, got, want, like in inputs_and_grads:
        if like is None:
            assert got is None
            continue
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert_close_rel(got, upstream * want, tol, f"{what} grad of {name}")
    return got_value, got_grads


# ----------------------------------------------------------------------------------------------------
# Values and gradients against float64.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, reduction", [("apa", "mean"), ("apa", "sum"), ("apa", "none"), ("logprobs", "none")])
def test_matches_float64(backend, kind, reduction):
    # H 37 and V 1003 are odd; 21 rows with ~13 counted in chunks of 4: boundaries inside, a partial last chunk.
    inputs = make_inputs((3, 7), 37, 1003)
    check(kind, backend, inputs, reduction=reduction, temperature=0.7, lam=0.5, chunk_size=4,
          what=f"{kind}/{reduction}")


@pytest.mark.parametrize("chunk_size", [1, "all counted rows", "all counted rows - 1", 10_000, None])
def test_chunk_boundaries(chunk_size):
    inputs = make_inputs((4, 5), 19, 517)
    hidden, weight, bias, labels, aux, adv, mask, weights = inputs
    counted = int(((labels != IGNORE) & mask).sum())
    sizes = {"all counted rows": counted, "all counted rows - 1": max(counted - 1, 1)}
    for reduction in ("mean", "none"):
        check("apa", "torch", inputs, reduction=reduction, chunk_size=sizes.get(chunk_size, chunk_size),
              what=f"chunk {chunk_size}, {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales(backend):
    """The forward-computed gradients are multiplied by the upstream gradient, not assumed to be 1."""
    inputs = make_inputs((9,), 16, 300)
    check("apa", backend, inputs, reduction="sum", chunk_size=3, upstream=-2.5, what="sum x -2.5")
    check("apa", "torch", inputs, reduction="mean", chunk_size=3, upstream=0.3, what="mean x 0.3")


def _strided_hidden():
    yield "time slice [:, :-1]", torch.randn(2, 9, 33)[:, :-1]
    yield "hidden stride 2", torch.randn(3, 4, 66)[..., ::2]
    yield "transposed leading dims", torch.randn(5, 3, 33).transpose(0, 1)
    yield "non-mergeable 3-D leading slice", torch.randn(2, 3, 4, 33)[:, :, 1:]


@pytest.mark.parametrize("name, hidden", list(_strided_hidden()), ids=lambda v: v if isinstance(v, str) else "")
def test_strided_hidden(name, hidden):
    _, weight, bias, labels, aux, adv, mask, weights = make_inputs(hidden.shape[:-1], 33, 211)
    inputs = (hidden, weight, bias, labels, aux, adv, mask, weights)
    check("apa", "torch", inputs, temperature=1.3, chunk_size=5, what=name)
    check("apa", "torch", inputs, reduction="none", chunk_size=5, what=f"{name}, none")


def test_triton_on_strided_hidden_without_bias():
    hidden = torch.randn(2, 6, 24)[:, 1:]
    _, weight, _, labels, aux, adv, mask, weights = make_inputs(hidden.shape[:-1], 24, 129)
    check("apa", "triton", (hidden, weight, None, labels, aux, adv, mask, weights), chunk_size=3, what="triton")


def test_gptj_vocab_logprobs_are_negative():
    hidden, weight, bias, labels, *_ = make_inputs((5,), 16, 50400, ignore_frac=0.0)
    got = linear_logprobs(hidden, weight, labels, bias=bias, chunk_size=2)
    want = torch.log_softmax(hidden.double() @ weight.double().T + bias.double(), -1).gather(-1, labels[:, None])
    assert_close_rel(got, want[:, 0], FLOAT32_TOL, "logprobs at V=50400")
    assert (got < 0).all(), "log-probabilities of a 50400-way softmax must be negative"


def test_only_the_inputs_that_need_it_get_a_gradient():
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((3, 4), 12, 97)
    want_value, (want_hidden, want_weight, _) = oracle("apa", hidden, weight, bias, labels, aux, adv, mask)
    frozen_head = weight.clone()
    h = hidden.clone().requires_grad_()
    linear_loss(h, frozen_head, labels, aux, adv, mask, bias=bias).backward()
    assert_close_rel(h.grad, want_hidden, FLOAT32_TOL, "hidden grad with a frozen lm_head")
    w = weight.clone().requires_grad_()
    linear_loss(hidden, w, labels, aux, adv, mask, bias=bias, reduction="none").sum().backward()
    _, (_, want_weight_sum, _) = oracle("apa", hidden, weight, bias, labels, aux, adv, mask, reduction="sum")
    assert_close_rel(w.grad, want_weight_sum, FLOAT32_TOL, "weight grad with detached hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_counts(backend):
    hidden, weight, bias, labels, aux, adv, mask, weights = make_inputs((2, 6), 8, 257)
    mask = torch.zeros_like(mask)
    for reduction in ("mean", "sum", "none"):
        value, grads = run_fused("apa", backend, hidden, weight, bias, labels, aux, adv, mask, reduction=reduction,
                                 weights=weights)
        assert torch.equal(value, torch.zeros_like(value))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_as_accurate_as_the_materialised_path(backend, dtype):
    # Per-token values over 128 rows: one scalar's rounding error is too random to compare by a factor.
    inputs = make_inputs((8, 16), 40, 611, dtype=dtype)
    hidden, weight, bias, labels, aux, adv, mask, weights = inputs
    common = dict(lam=0.5, reduction="none", weights=weights)
    want_value, want_grads = oracle("apa", hidden, weight, bias, labels, aux, adv, mask, **common)
    got_value, got_grads = run_fused("apa", backend, hidden, weight, bias, labels, aux, adv, mask, chunk_size=5,
                                     **common)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    materialised = apa_fast.loss(leaves[0] @ leaves[1].T + leaves[2], labels, aux, adv, mask, lam=0.5,
                                 reduction="none", backend=backend)
    (materialised * weights).sum().backward()
    floor = 1e-6
    assert rel_err(got_value, want_value) <= LOW_PRECISION_FACTOR * rel_err(materialised, want_value) + floor
    for name, got, leaf, want in zip(("hidden", "weight", "bias"), got_grads, leaves, want_grads, strict=True):
        assert got.dtype == dtype
        assert rel_err(got, want) <= LOW_PRECISION_FACTOR * rel_err(leaf.grad, want) + floor, name


# ----------------------------------------------------------------------------------------------------
# Work and memory: one chunk of logits at a time; rows that do not count are never projected.
# ----------------------------------------------------------------------------------------------------
class LargestLogitsChunk(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most rows of any floating tensor of shape (..., rows, V) an op allocates while active."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # e.g. weight.T: (H, V), no new memory
            return out
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() >= 2 \
                    and tensor.shape[-1] == self.vocab:
                self.rows = max(self.rows, tensor.numel() // self.vocab)
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_at_most_one_chunk_of_logits_exists(reduction, monkeypatch):
    rows, vocab, chunk = 64, 1000, 8
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((rows,), 24, vocab, ignore_frac=0.0, mask_frac=0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    watched = []

    def sweep_watched(*args, **kwargs):  # the sweep runs inside a custom op, which a dispatch mode sees whole
        with LargestLogitsChunk(vocab) as mode:
            watched.append(mode)
            return original_sweep(*args, **kwargs)

    original_sweep = linear_module._sweep
    monkeypatch.setattr(linear_module, "_sweep", sweep_watched)
    linear_loss(h, w, labels, aux, adv, mask, bias=bias, reduction=reduction, chunk_size=chunk).sum().backward()
    assert len(watched) == (1 if reduction == "mean" else 2)  # "none" recomputes in the backward
    assert all(mode.rows == chunk for mode in watched)
    with LargestLogitsChunk(vocab) as materialised_mode:
        apa_fast.loss(h @ w.T + bias, labels, aux, adv, mask).backward()
    assert materialised_mode.rows >= rows  # the check above can fail: the materialised path does it


def test_rows_that_do_not_count_are_never_projected(monkeypatch):
    projected = []
    original = linear_module._Projection.logits
    monkeypatch.setattr(linear_module._Projection, "logits",
                        lambda self, rows, *out: projected.append(rows.shape[0]) or original(self, rows, *out))
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((4, 10), 16, 101, ignore_frac=0.0)
    mask[:] = False
    mask[1, 3:6] = True
    w = weight.clone().requires_grad_()
    linear_loss(hidden, w, labels, aux, adv, mask, bias=bias, reduction="none", chunk_size=2).sum().backward()
    assert projected == [2, 1, 2, 1]  # forward, then the backward's recomputation: 3 counted rows each


def test_no_gradient_work_under_no_grad(monkeypatch):
    sweeps = []
    original = linear_module._sweep
    monkeypatch.setattr(linear_module, "_sweep", lambda *a, **k: sweeps.append(k.get("grads")) or original(*a, **k))
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((3, 5), 16, 101)
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        value = linear_loss(hidden, w, labels, aux, adv, mask, bias=bias)
    assert not value.requires_grad and sweeps == [None]


def test_default_chunk_size_bounds_accumulations_and_memory(monkeypatch):
    """The model of `_chunk_rows`: at most MAX_ACCUMULATIONS chunks above the accumulation floor (128 rows on
    CPU, 2,432 bf16 rows on CUDA), capped by MAX_CHUNK_BYTES, the free memory and the rows themselves."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    chunk = linear_module._chunk_rows
    monkeypatch.setattr(linear_module, "_free_bytes", lambda device: 80 * 2**30)
    assert chunk(0, 1792, 1024, 50400, torch.float32, cpu) == 448  # 2,048 tokens, 1 in 8 masked: 4 chunks
    assert chunk(0, 3584, 1024, 50400, torch.float32, cpu) == 896  # 4,096 tokens: 4 chunks
    assert chunk(0, 300, 1024, 50400, torch.float32, cpu) == 128  # the floor: 3 chunks, not 4 of 75 rows
    assert chunk(0, 50, 1024, 50400, torch.float32, cpu) == 50  # never more than the rows
    assert chunk(0, 8192, 4096, 50400, torch.bfloat16, cuda) == 2432  # the floor: 4 chunks, not of 2,048 rows
    assert chunk(0, 65536, 4096, 50400, torch.bfloat16, cuda) == 16384  # 4 chunks of 1.65 GB of logits
    huge = chunk(0, 2**20, 4096, 151936, torch.bfloat16, cuda)
    assert huge * 151936 * 2 <= linear_module.MAX_CHUNK_BYTES["cuda"] and huge >= 2432
    monkeypatch.setattr(linear_module, "_free_bytes", lambda device: 2**30)
    assert chunk(0, 16384, 4096, 50400, torch.bfloat16, cuda) * 50400 * 2 <= 2**30 // 8
    monkeypatch.setattr(linear_module, "_free_bytes", lambda device: 0)
    assert chunk(0, 16384, 4096, 50400, torch.bfloat16, cuda) == 1
    assert chunk(7, 16384, 4096, 50400, torch.bfloat16, cuda) == 7


# ----------------------------------------------------------------------------------------------------
# Errors: raised before any work, naming the argument.
# ----------------------------------------------------------------------------------------------------
def _good():
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((2, 3), 5, 11)
    mask[0, 0] = True  # labels are range-checked where counted only: all 6 hidden (0.25**6 = 2e-4 of seeds) hid them
    return dict(hidden=hidden, weight=weight, labels=labels, ref_logprobs=aux, advantages=adv, mask=mask, bias=bias)


def _ungathered_zero3_weight():
    """What DeepSpeed leaves in a ZeRO-3 parameter outside its module's forward: an empty local slice."""
    param = torch.nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_shape = 7, torch.Size((11, 5))
    return param


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=torch.randn(2, 3, 5).double()), TypeError, "hidden must be float32"),
        (dict(hidden=torch.randn(2, 3, 0)), ValueError, "H >= 1"),
        (dict(weight=torch.randn(11, 6)), ValueError, r"weight must have shape \(V, 5\)"),
        (dict(weight=torch.randn(55)), ValueError, r"weight must have shape \(V, 5\)"),
        (dict(weight=torch.randn(0, 5)), ValueError, r"weight must have shape \(V, 5\)"),
        (dict(weight="lm_head"), TypeError, "weight must be a torch.Tensor"),
        (dict(weight=torch.randn(11, 5).double()), TypeError, "weight must be float32, bfloat16 or float16"),
        (dict(weight=torch.randn(11, 5, device="meta")), ValueError, "weight is on meta but hidden is on cpu"),
        (dict(weight=_ungathered_zero3_weight()), ValueError, r"weight is a DeepSpeed ZeRO-3 .*not gathered"),
        (dict(bias=torch.randn(12)), ValueError, r"bias must have shape \(11,\)"),
        (dict(bias=torch.randn(11).double()), TypeError, "bias must be float32, bfloat16 or float16"),
        (dict(logit_scale=0.0), ValueError, "logit_scale"),
        (dict(logit_softcap=-30.0), ValueError, "logit_softcap"),
        (dict(normalizer=True), ValueError, "normalizer"),
        (dict(bias=torch.randn(11, device="meta")), ValueError, "bias is on meta"),
        (dict(bias=1.0), TypeError, "bias must be a torch.Tensor or None"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"labels must have shape .*hidden.shape"),
        (dict(labels=torch.full((2, 3), 11)), ValueError, r"labels must be in \[0, 11\)"),
        (dict(labels=torch.rand(2, 3)), TypeError, "labels must be an integer"),
        (dict(ref_logprobs=torch.randn(3, 2)), ValueError, "ref_logprobs must have the token shape"),
        (dict(advantages=torch.randn(2, 3, device="meta")), ValueError, "advantages is on meta but hidden"),
        (dict(mask=torch.rand(2, 3) + 0.1), ValueError, "mask must hold only 0/1"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), ValueError, "chunk_size"),
        (dict(chunk_size=True), ValueError, "chunk_size"),
        (dict(lam=0.0), ValueError, "lam"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_errors(change, error, match):
    args = _good()
    args.update(change)
    with pytest.raises(error, match=match):
        linear_loss(**args)


def test_linear_logprobs_checks_its_arguments():
    args = _good()
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 5\)"):
        linear_logprobs(args["hidden"], args["weight"].T, args["labels"])
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(args["hidden"], args["weight"], args["labels"], temperature=0)


# ----------------------------------------------------------------------------------------------------
# Logits as models compute them: scaled, soft-capped; precision as F.linear; per-sequence values.
# ----------------------------------------------------------------------------------------------------
def _oracle_scaled(hidden, weight, bias, labels, aux, adv, mask, *, scale, softcap, temperature, lam=1.0):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = leaves
    z = scale * (h @ w.T + b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    counted = (labels != IGNORE) & mask
    logp = torch.log_softmax(z / temperature, -1).gather(-1, torch.where(counted, labels, 0)[..., None])[..., 0]
    terms = torch.where(counted, (logp - aux.double() - adv.double() / lam) ** 2, 0.0)
    value = terms.sum() / counted.sum()
    value.backward()
    return value.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, softcap", [(0.0625, None), (1.0, 3.0), (2.5, 4.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logit_scale_and_softcap(backend, scale, softcap, reduction):
    inputs = make_inputs((3, 5), 16, 203)
    hidden, weight, bias, labels, aux, adv, mask, weights = inputs
    want_value, want_grads = _oracle_scaled(hidden, weight, bias, labels, aux, adv, mask, scale=scale,
                                            softcap=softcap, temperature=0.7, lam=0.5)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    value = linear_loss(leaves[0], leaves[1], labels, aux, adv, mask, bias=leaves[2], lam=0.5, temperature=0.7,
                        logit_scale=scale, logit_softcap=softcap, ignore_index=IGNORE, backend=backend,
                        reduction=reduction, chunk_size=4)
    if reduction == "none":
        value = value.sum() / ((labels != IGNORE) & mask).sum()
    value.backward()
    assert_close_rel(value.detach(), want_value, FLOAT32_TOL, "value")
    for name, leaf, want in zip(("hidden", "weight", "bias"), leaves, want_grads, strict=True):
        assert_close_rel(leaf.grad, want, FLOAT32_TOL, f"grad of {name}")


def test_autocast_projects_like_f_linear():
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((3, 4), 16, 97)
    got_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_loss(got_leaves[0], got_leaves[1], labels, aux, adv, mask, bias=got_leaves[2],
                          ignore_index=IGNORE, backend="torch")
        logits = torch.nn.functional.linear(want_leaves[0], want_leaves[1], want_leaves[2])
        assert logits.dtype == torch.bfloat16
        want = apa_fast.loss(logits, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch")
    got.backward()
    want.backward()
    assert_close_rel(got.detach(), want.detach(), 2e-5, "autocast value")
    for name, g, w in zip(("hidden", "weight", "bias"), got_leaves, want_leaves, strict=True):
        assert g.grad.dtype == torch.float32, name  # back in the leaves' own dtype, like F.linear's
        assert_close_rel(g.grad, w.grad, 2e-2, f"autocast grad of {name}")  # bf16 chunk products


def test_low_precision_hidden_with_a_float32_head():
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((3, 4), 16, 97)
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    value = linear_loss(h, w, labels, aux, adv, mask, ignore_index=IGNORE, backend="torch")
    value.backward()
    want_value, _ = oracle("apa", h.detach().float(), weight, None, labels, aux, adv, mask)
    assert_close_rel(value, want_value, FLOAT32_TOL, "projected in float32")
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_linear_per_sequence_values_and_normalizer():
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((3, 4), 16, 97)
    seq_adv = torch.randn(3)
    want = linear_loss(hidden, weight, labels, aux, seq_adv[:, None].expand(3, 4), mask, bias=bias,
                       ignore_index=IGNORE, reduction="sum")
    got = linear_loss(hidden, weight, labels, aux, seq_adv, mask, bias=bias, ignore_index=IGNORE, normalizer=2.0)
    assert_close_rel(got, want / 2.0, FLOAT32_TOL, "sum / normalizer")


def test_scalar_loss_backward_allocates_no_weight_sized_buffer():
    """The weight gradient was accumulated in the forward: backward hands it over, with no (V, H) buffer (not
    even autograd's zeros for the op's gradient outputs)."""
    hidden, weight, bias, labels, aux, adv, mask, _ = make_inputs((4, 8), 16, 301)
    w = weight.clone().requires_grad_()
    value = linear_loss(hidden, w, labels, aux, adv, mask, bias=bias)
    with LargestLogitsChunk(hidden.shape[-1]) as backward_mode:  # counts (..., rows, H) tensors: (V, H) included
        value.backward()
    assert backward_mode.rows < weight.shape[0]

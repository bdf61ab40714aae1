"""`apa_fast.gae` on every backend against a float64 per-timestep oracle, on fresh random inputs.

The `cpu` backend needs the compiled extension (`apa_fast._C`, installed or built just in time: test_build.py
tests that) and is skipped, with the reason, when there is none; the `cuda` tests are marked and need a GPU
(`pytest -m cuda tests/`).
"""

import numpy as np
import pytest
import torch
from conftest import assert_close_rel
from oracles import gae_inputs as make_inputs
from oracles import gae_mask as make_mask
from oracles import gae_oracle as oracle
from oracles import gae_returns_scale
from oracles import gae_tolerance as tolerance

from apa_fast import _dispatch, apa_loss_from_logprobs
from apa_fast.gae import gae
from apa_fast.reference import gae_loop

CPU_BACKENDS = ("torch", "cpu")
LAYOUTS = ("no_mask", "right_padding", "left_padding", "holes", "empty_rows")
COEFFICIENTS = [(1.0, 0.95), (0.99, 0.0), (0.9, 1.0), (1.0, 1.0), (0.0, 0.7)]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    if request.param == "cpu" and _dispatch.extension() is None:
        pytest.skip(f"the compiled extension is not loaded: {_dispatch.extension_error()}")
    return request.param


def check_against_oracle(rewards, values, mask, *, gamma, lam, backend, whiten=False):
    got_adv, got_ret = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, backend=backend)
    want_adv, want_ret = oracle(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)
    expected_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert got_adv.dtype == got_ret.dtype == expected_dtype
    assert got_adv.shape == got_ret.shape == rewards.shape and got_adv.is_contiguous()
    tol = tolerance(rewards.dtype, rewards.shape[1])
    assert_close_rel(got_adv.cpu(), want_adv, tol, f"advantages ({backend})")
    assert_close_rel(got_ret.cpu(), want_ret, tol, f"returns ({backend})",
                     scale=gae_returns_scale(want_ret, values, mask, rewards.dtype, tol))
    if mask is not None:
        outside = ~mask.bool().to(got_adv.device)
        assert (got_adv[outside] == 0).all() and (got_ret[outside] == 0).all(), "nonzero output at a masked position"
    return got_adv, got_ret


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gamma, lam", COEFFICIENTS)
def test_matches_oracle(backend, layout, gamma, lam):
    rewards, values = make_inputs(5, 67)
    check_against_oracle(rewards, values, make_mask(layout, 5, 67), gamma=gamma, lam=lam, backend=backend)


@pytest.mark.parametrize("masked", [False, True])
def test_single_position(backend, masked):
    rewards, values = make_inputs(1, 1)
    mask = torch.tensor([[not masked]]) if masked else None
    adv, ret = check_against_oracle(rewards, values, mask, gamma=0.9, lam=0.95, backend=backend)
    if not masked:
        assert adv.item() == (rewards - values).item()  # the same float32 subtraction


@pytest.mark.parametrize("layout", ["no_mask", "holes"])
def test_long_rows(backend, layout):
    rows, cols = 3, 4099  # thousands of steps, not a multiple of any tile or chunk
    rewards, values = make_inputs(rows, cols)
    check_against_oracle(rewards, values, make_mask(layout, rows, cols), gamma=0.999, lam=0.98, backend=backend)


@pytest.mark.parametrize("threads", [2, 5])
def test_cpu_kernel_splits_time_when_rows_are_few(threads):
    """Fewer rows than threads: the C++ kernel cuts rows into chunks and joins them with the scan algebra
    the CUDA kernel uses; both 2 and an odd 5 chunks must reproduce the sequential recurrence."""
    if _dispatch.extension() is None:
        pytest.skip(f"the compiled extension is not loaded: {_dispatch.extension_error()}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rewards, values = make_inputs(1, 6 * 1024 + 7)
        for layout in ("no_mask", "holes", "left_padding"):
            mask = make_mask(layout, 1, rewards.shape[1])
            check_against_oracle(rewards, values, mask, gamma=0.99, lam=0.95, backend="cpu")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("layout", ["no_mask", "holes", "empty_rows"])
def test_whitening(backend, layout):
    rewards, values = make_inputs(6, 50)
    mask = make_mask(layout, 6, 50)
    adv, ret = check_against_oracle(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend, whiten=True)
    valid = torch.ones_like(adv, dtype=torch.bool) if mask is None else mask
    assert abs(adv[valid].mean().item()) < 1e-5 and abs(adv[valid].std().item() - 1) < 1e-5
    raw, raw_returns = gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    torch.testing.assert_close(ret, raw_returns, rtol=0, atol=0)  # returns never see the whitening


@pytest.mark.parametrize("valid_positions", [0, 1])
def test_whitening_below_two_valid_positions_gives_zeros(backend, valid_positions):
    rewards, values = make_inputs(2, 9)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 4] = valid_positions == 1
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.95, whiten=True, backend=backend)
    assert (adv == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(backend, dtype):
    """16-bit inputs are computed in float32 (compared with the oracle on the same rounded inputs)."""
    rewards, values = make_inputs(4, 300, dtype=dtype)
    check_against_oracle(rewards, values, make_mask("holes", 4, 300), gamma=0.99, lam=0.95, backend=backend)


def test_mixed_dtypes_and_integer_mask(backend):
    rewards, values = make_inputs(3, 40)
    mask = make_mask("holes", 3, 40)
    got = gae(rewards, values.bfloat16(), mask.long(), gamma=0.95, lam=0.9, backend=backend)
    want = oracle(rewards, values.bfloat16().float(), mask, gamma=0.95, lam=0.9)
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, 1e-6, "mixed dtypes")


def test_masked_out_inputs_are_never_read(backend):
    rewards, values = make_inputs(4, 33)
    mask = make_mask("holes", 4, 33)
    want = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    poisoned_rewards = rewards.masked_fill(~mask, float("nan"))
    poisoned_values = values.masked_fill(~mask, float("inf"))
    got = gae(poisoned_rewards, poisoned_values, mask, gamma=0.9, lam=0.8, backend=backend)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_non_contiguous_inputs_and_no_gradient(backend):
    rewards, values = make_inputs(40, 6)
    rewards, values = rewards.t(), values.t().requires_grad_()
    adv, ret = check_against_oracle(rewards, values, None, gamma=0.97, lam=0.9, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_batches(backend, shape):
    rewards, values = torch.randn(shape), torch.randn(shape)
    adv, ret = gae(rewards, values, torch.ones(shape, dtype=torch.bool), whiten=True, backend=backend)
    assert adv.shape == ret.shape == shape


def test_backends_agree():
    rewards, values = make_inputs(8, 513)
    mask = make_mask("holes", 8, 513)
    backends = [name for name in CPU_BACKENDS if name == "torch" or _dispatch.extension() is not None]
    results = {name: gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend=name) for name in backends}
    for name, (adv, ret) in results.items():
        assert_close_rel(adv, results["torch"][0], 1e-5, f"advantages, {name} vs torch")
        assert_close_rel(ret, results["torch"][1], 1e-5, f"returns, {name} vs torch")


@pytest.mark.parametrize("mask_layout", ["no_mask", "right_padding"])
def test_trainers_loop_agrees_at_valid_positions(mask_layout):
    """The benchmark baseline computes the same numbers where its own masking is right."""
    rewards, values = make_inputs(4, 30, dtype=torch.float64)
    mask = make_mask(mask_layout, 4, 30)
    loop_adv, loop_ret = gae_loop(rewards, values, mask, gamma=0.98, lam=0.9)
    adv, ret = gae(rewards, values, mask, gamma=0.98, lam=0.9)
    valid = torch.ones_like(adv, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(adv[valid], loop_adv[valid])
    torch.testing.assert_close(ret[valid], loop_ret[valid])


def test_auto_picks_the_compiled_cpu_kernel_when_loaded():
    expected = "cpu" if _dispatch.extension() is not None else "torch"
    assert _dispatch.pick_gae_backend("auto", torch.device("cpu")) == expected


# --- torch.compile and the op's registration ------------------------------------------------------------

@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["no_mask", "holes"])
def test_compiled_op_passes_opcheck(layout, dtype, whiten):
    """Schema, fake kernel (eager and under dynamic-shape AOT tracing) and autograd registration agree with the
    real CPU kernel."""
    if _dispatch.extension() is None:
        pytest.skip(f"the compiled extension is not loaded: {_dispatch.extension_error()}")
    rewards, values = make_inputs(5, 67, dtype=dtype)
    torch.library.opcheck(torch.ops.apa_fast.gae.default,
                          (rewards, values, make_mask(layout, 5, 67), 0.99, 0.95, whiten))


@pytest.mark.parametrize("layout", ["no_mask", "holes"])
def test_dispatch_op_passes_opcheck(backend, layout):
    """`gae` after validation is the op apa_fast::gae_dispatch, whatever the backend: mixed input dtypes and a
    0/1 mask go in as they are."""
    rewards, values = make_inputs(4, 50)
    mask = make_mask(layout, 4, 50)
    mask = None if mask is None else mask.long()
    torch.library.opcheck(torch.ops.apa_fast.gae_dispatch.default,
                          (rewards, values.bfloat16(), mask, 0.99, 0.95, True, backend))


def test_compiles_without_graph_breaks_and_matches_eager(backend):
    """fullgraph=True fails on any graph break: after the argument checks, gae is one op with a fake kernel."""
    rewards, values = make_inputs(6, 200)
    mask = make_mask("holes", 6, 200)
    step = lambda r, v, m: gae(r, v, m, gamma=0.99, lam=0.95, whiten=True, backend=backend)
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(rewards, values, mask), step(rewards, values, mask), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close_rel(got, want, 1e-5, f"compiled vs eager ({backend})")  # Inductor may reorder float32 sums


# --- errors -----------------------------------------------------------------------------------------------

def _good():
    rewards, values = make_inputs(2, 5)
    return {"rewards": rewards, "values": values, "mask": torch.ones(2, 5, dtype=torch.bool)}


BAD_INPUTS = [
    ("rewards", {"rewards": torch.randn(10)}, ValueError, "rewards must be 2-D"),
    ("values", {"values": torch.randn(2, 6)}, ValueError, "values must have the shape"),
    ("mask", {"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask must have the shape"),
    ("rewards", {"rewards": torch.ones(2, 5, dtype=torch.long)}, TypeError, "rewards must be a floating-point"),
    ("values", {"values": torch.ones(2, 5, dtype=torch.int32)}, TypeError, "values must be a floating-point"),
    ("values", {"values": torch.randn(2, 5, device="meta")}, ValueError, "values must be on the device"),
    ("mask", {"mask": torch.ones(2, 5, device="meta")}, ValueError, "mask must be on the device"),
    ("rewards", {"rewards": [[1.0] * 5] * 2}, TypeError, "rewards must be a torch.Tensor"),
]


@pytest.mark.parametrize("what, change, error, message", BAD_INPUTS, ids=[f"{b[0]}-{b[3]}" for b in BAD_INPUTS])
def test_bad_tensors_raise(backend, what, change, error, message):
    with pytest.raises(error, match=message):
        gae(**{**_good(), **change}, backend=backend)


@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize("number, message", [
    *[(number, r"in \[0, 1\], got") for number in (-0.1, 1.5, float("nan"), float("inf"), 1 + 1e-12)],
    # bools are a bug, not 1 or 0 (issue 19: gamma=True was taken as 1.0), as the loss ops refuse them
    *[(number, r"a real number \(an int or float, not a bool\), got")
      for number in (True, False, np.bool_(True), torch.tensor(0.5), "0.9", None)]])
def test_coefficients_outside_unit_interval_raise(backend, name, number, message):
    with pytest.raises(ValueError, match=f"^{name} must be {message}"):
        gae(**_good(), **{name: number}, backend=backend)


@pytest.mark.parametrize("gamma, lam", [(np.float32(0.9), np.float64(0.8)), (np.int64(1), 0), (1, np.float16(0.5))])
def test_numpy_and_integer_coefficients_are_the_python_numbers(backend, gamma, lam):
    rewards, values = make_inputs(3, 41)
    got = gae(rewards, values, gamma=gamma, lam=lam, backend=backend)
    want = gae(rewards, values, gamma=float(gamma), lam=float(lam), backend=backend)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


BAD_MASK_VALUES = [(torch.float32, 0.5), (torch.float32, 2.0), (torch.float32, float("nan")),
                   (torch.float64, float("inf")), (torch.float16, -1.0), (torch.bfloat16, 0.25), (torch.int64, 2),
                   (torch.int8, -1), (torch.uint8, 255)]


@pytest.mark.parametrize("dtype, bad", BAD_MASK_VALUES, ids=[f"{d}-{v}" for d, v in BAD_MASK_VALUES])
def test_mask_values_other_than_zero_one_raise_as_in_the_loss_ops(backend, dtype, bad):
    """gae accepted 0.5, 2 and NaN (issue 19); now the loss ops' error, even at a position another mask value
    would hide."""
    rewards, values = make_inputs(3, 17)
    mask = make_mask("holes", 3, 17).to(dtype)
    mask[2, 16] = bad
    with pytest.raises(ValueError, match=r"^mask must hold only 0/1 \(or bool\) values; found ") as raised:
        gae(rewards, values, mask, backend=backend)
    with pytest.raises(ValueError) as from_loss:
        apa_loss_from_logprobs(rewards, values, values, mask)
    assert str(raised.value) == str(from_loss.value)


def test_zero_one_masks_of_every_dtype_match_the_bool_mask(backend):
    rewards, values = make_inputs(4, 23)
    mask = make_mask("holes", 4, 23)
    want = gae(rewards, values, mask, gamma=0.97, lam=0.9, backend=backend)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8):
        got = gae(rewards, values, mask.to(dtype), gamma=0.97, lam=0.9, backend=backend)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), dtype
    with pytest.raises(TypeError, match="mask must be a bool, integer or float tensor of 0/1 values, got torch.compl"):
        gae(rewards, values, mask.to(torch.complex64), backend=backend)


def test_bad_mask_raises_under_compile():
    """The value check runs inside apa_fast::gae_dispatch: a compiled graph raises the eager error, no graph break."""
    rewards, values = make_inputs(2, 9)
    mask = torch.ones(2, 9)
    compiled = torch.compile(lambda r, v, m: gae(r, v, m, backend="torch"), fullgraph=True)
    compiled(rewards, values, mask)
    mask[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"mask must hold only 0/1 \(or bool\) values; found nan"):
        compiled(rewards, values, mask)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        gae(**_good(), backend="triton")


def test_cuda_backend_on_cpu_tensors_raises():
    with pytest.raises(RuntimeError, match="backend='cuda' runs on cuda tensors"):
        gae(**_good(), backend="cuda")


def test_failed_build_is_explained(monkeypatch):
    failed = _dispatch.ExtensionStatus(None, "failed build", "/cache/x", "error: simulated compiler failure")
    monkeypatch.setattr(_dispatch, "_status", failed)
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run: .* failed .*\nerror: simulated compiler"):
        gae(**_good(), backend="cpu")
    assert _dispatch.pick_gae_backend("auto", torch.device("cpu")) == "torch"


OP_CHECKS = [
    ({"rewards": torch.randn(10), "values": torch.randn(10)}, "rewards must be 2-D"),
    ({"values": torch.randn(2, 6)}, "values must have the shape of rewards"),
    ({"values": torch.randn(2, 5, dtype=torch.float64)}, "values must have the dtype of rewards"),
    ({"rewards": torch.ones(2, 5, dtype=torch.long), "values": torch.ones(2, 5, dtype=torch.long)},
     "rewards must be float32, float64, float16 or bfloat16"),
    ({"mask": torch.ones(2, 5)}, "mask must be a bool tensor"),
    ({"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask must have the shape of rewards"),
    ({"gamma": 1.01}, "gamma must be in"),
    ({"lam": -1.0}, "lam must be in"),
]


@pytest.mark.parametrize("change, message", OP_CHECKS, ids=[c[1] for c in OP_CHECKS])
def test_compiled_op_checks_its_arguments(change, message):
    if _dispatch.extension() is None:
        pytest.skip(f"the compiled extension is not loaded: {_dispatch.extension_error()}")
    arguments = {**_good(), "gamma": 1.0, "lam": 0.95, "whiten": False, **change}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.apa_fast.gae(arguments["rewards"], arguments["values"], arguments["mask"], arguments["gamma"],
                               arguments["lam"], arguments["whiten"])


# --- CUDA ------------------------------------------------------------------------------------------------

def on_gpu(test):
    """Marks a test `cuda` and skips it without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


# Shapes that pick each of the kernel's row-group sizes: many short rows (a warp per row, 513 blocks so that
# the last block merges several partials per thread), a mid batch, and few long rows (a block per row, many
# tiles); no length is a multiple of a tile.
CUDA_SHAPES = [(4099, 37), (64, 2050), (2, 20011), (1, 1)]


@on_gpu
@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("layout", ["no_mask", "left_padding", "holes", "empty_rows"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=[f"{r}x{c}" for r, c in CUDA_SHAPES])
def test_cuda_kernel_matches_oracle(shape, layout, whiten):
    rows, cols = shape
    rewards, values = make_inputs(rows, cols, device="cuda")
    mask = make_mask(layout, rows, cols)
    mask = None if mask is None else mask.cuda()
    check_against_oracle(rewards, values, mask, gamma=0.995, lam=0.97, backend="cuda", whiten=whiten)


@on_gpu
@pytest.mark.parametrize("gamma, lam", COEFFICIENTS)
def test_cuda_coefficients(gamma, lam):
    rewards, values = make_inputs(33, 700, device="cuda")
    mask = make_mask("holes", 33, 700).cuda()
    check_against_oracle(rewards, values, mask, gamma=gamma, lam=lam, backend="cuda")


@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cuda_input_dtypes(dtype):
    rewards, values = make_inputs(50, 1000, dtype=dtype, device="cuda")
    mask = make_mask("holes", 50, 1000).cuda()
    check_against_oracle(rewards, values, mask, gamma=0.99, lam=0.95, backend="cuda", whiten=True)


@on_gpu
def test_cuda_agrees_with_cpu_backends_and_repeats_exactly():
    rewards, values = make_inputs(300, 1500)
    mask = make_mask("holes", 300, 1500)
    first = gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.95, whiten=True, backend="cuda")
    again = gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=0.99, lam=0.95, whiten=True, backend="cuda")
    for a, b in zip(first, again, strict=True):  # the whitening counter is reset on every call
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in [name for name in CPU_BACKENDS if name == "torch" or _dispatch.extension() is not None]:
        want = gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend=name)
        for got, expected in zip(first, want, strict=True):
            assert_close_rel(got.cpu(), expected, 1e-5, f"cuda vs {name}")


@on_gpu
@pytest.mark.parametrize("backend_name", ["cuda", "torch"])
def test_cuda_paths_never_synchronise_the_host(backend_name):
    rewards, values = make_inputs(64, 512, device="cuda")
    mask = make_mask("holes", 64, 512).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True, backend=backend_name)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@on_gpu
def test_cuda_auto_and_empty_batches():
    assert _dispatch.pick_gae_backend("auto", torch.device("cuda")) == "cuda"
    for shape in [(0, 7), (4, 0)]:
        adv, ret = gae(torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda"), whiten=True)
        assert adv.shape == ret.shape == shape

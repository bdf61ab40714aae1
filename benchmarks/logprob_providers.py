"""The log-prob ops' benchmark cases: who computes them (providers), on what inputs, and the timed steps.

Ops: ``apa_loss`` (`apa_fast.loss`, APA with lam 0.1 as its authors ran it) and ``logprobs``
(`apa_fast.logprobs`). Providers, by the names the records carry:

* ``apa_fast``: the fused op (Triton on CUDA; the chunked torch backend on a CPU, noted as ``backend``) in its
  two-kernel design (``APA_FAST_FUSED_GRAD=0``: the forward reads the logits, the backward reads them again
  and writes the gradient); variant ``inplace`` passes ``inplace_backward=True``; variant ``fused_grad`` is
  the training-mode design (``APA_FAST_FUSED_GRAD=1``: one kernel per row writes the gradient during the
  forward, the backward returns it);
* ``eager``: the plain eager code a trainer runs today (`benchmarks.baselines`: log_softmax in float32,
  gather, the formula); records before December 4, 2026 named ``torch`` / ``torch_compile`` timed
  `apa_fast.reference` instead, and are relabelled ``reference`` / ``reference_compiled``;
* ``eager_compiled``: ``torch.compile`` of that same plain eager code (static shapes);
* ``apa_fast_compiled``: ``torch.compile(fullgraph=True)`` of the loss step with apa_fast inside (its ops are
  custom ops: no graph break), beside ``eager_compiled``;
* ``trl`` / ``verl`` / ``openrlhf``: those trainers' log-prob functions (`benchmarks.peers`, on ``(8, N / 8, V)``
  logits as they receive them), with the APA epilogue in PyTorch; CPU and GPU;
* ``flash_attn`` / ``liger``: their fused cross-entropy kernels for the log-probs, with the APA epilogue in
  PyTorch; only where the package imports, on CUDA, and only if its gradient matches the reference.

Before its first case, each fused provider's gradient is checked against the reference at a small size
(a mismatch fails for apa_fast and skips an alternative, whose API may have changed).

Modes: ``forward`` (the loss, with the autograd graph built as in training), ``backward`` (the gradient
from a forward done untimed), ``full`` (both). Two byte counts go with each case (benchmarks/README.md gives
the formulas): the floor (`floor_bytes`: the logits read once and their gradient written once, 2L for
forward+backward with L the logits' bytes) and the bytes the provider's design moves (`bytes_by_design`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import apa_fast
from apa_fast import reference
from benchmarks import baselines, peers

OPS = ("apa_loss", "logprobs")
MODES = ("forward", "backward", "full")
LAM = 0.1  # 1/lam = 10, the APA authors' setting
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Passes over the logits that the memory floor counts per mode: one read in the forward, one gradient write in
# the backward; 2L for forward+backward, whatever the design.
FLOOR_PASSES = {"forward": 1, "backward": 1, "full": 2}
# APA_FAST_FUSED_GRAD per apa_fast variant: each record names the design that ran, never "auto".
FUSED_GRAD = {None: "0", "inplace": "0", "fused_grad": "1"}
# Passes over the logits (L each) that each fused design moves per mode, counting [tokens x vocab] traffic
# only (the per-row numbers are 16 bytes a token). fused_grad assumes its re-read of each row hits L2, and
# a backward with grad_output == 1 (a scalar loss's backward): it returns the gradient, moving nothing.
DESIGN_PASSES = {
    ("apa_fast", None): {"forward": 1, "backward": 2, "full": 3},
    ("apa_fast", "inplace"): {"forward": 1, "backward": 2, "full": 3},
    ("apa_fast", "fused_grad"): {"forward": 2, "backward": 0, "full": 2},
    # apa_fast's ops are opaque custom ops to torch.compile: the compiled step moves what the eager one does.
    ("apa_fast_compiled", None): {"forward": 1, "backward": 2, "full": 3},
    # flash-attn's cross-entropy: lse forward; backward reads the logits and writes the gradient.
    ("flash_attn", None): {"forward": 1, "backward": 2, "full": 3},
    # Liger's cross-entropy writes the gradient into the logits during the forward; with per-token losses
    # its backward multiplies that gradient by the upstream vector (read + write).
    ("liger", None): {"forward": 2, "backward": 2, "full": 4},
}
# (package to import, provider name): the public fused cross-entropy kernels, GPU only.
ALTERNATIVES = (("liger_kernel", "liger"), ("flash_attn", "flash_attn"))

GPU_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
GPU_VOCABS = (32000, 50400, 128256, 151936)  # Llama-2, GPT-J / Pythia, Llama-3, Qwen-2
# The vocabulary sweep of the first GPU run: padded and odd vocabularies beside the large ones (Llama-2 + pad,
# GPT-2, Llama-3, Qwen-2), where full-width loads and the design choice by the byte model are on trial.
VOCAB_SWEEP = (32001, 50257, 128256, 151936)
GPU_DTYPES = ("bfloat16", "float32")
HEADLINE = {"tokens": 16384, "vocab": 50400, "dtype": "bfloat16"}  # the target shape
CPU_SHAPE = {"tokens": 1024, "vocab": 32000, "dtype": "float32"}
CPU_TOKENS = (512, 1024)
CPU_LARGE = ([4096], [50400], ["float32"])  # issue 21's second CPU ratio: 4,096 x 50,400 (tokens, vocabs, dtypes)
CPU_MEMORY_TARGET = {"tokens": 2048, "vocab": 50400, "dtype": "float32"}  # torch backend <= 1/4 of the reference


@dataclass(frozen=True)
class Case:
    """One measurement: an op, a provider (and variant), a mode and a shape."""

    op: str
    provider: str
    mode: str
    tokens: int
    vocab: int
    dtype: str
    variant: str | None = None

    @property
    def id(self) -> str:
        provider = self.provider + (f"-{self.variant}" if self.variant else "")
        return f"{self.op}-{provider}-{self.mode}-{self.tokens}x{self.vocab}-{self.dtype}"

    def fields(self) -> dict:
        """The record fields naming this case (``variant`` only when set)."""
        fields = asdict(self)
        if fields["variant"] is None:
            del fields["variant"]
        return fields

    @property
    def mutates_logits(self) -> bool:
        """The provider overwrites the logits (in-place backward; Liger writes its gradient during forward)."""
        return self.variant == "inplace" or self.provider == "liger"


# ----------------------------------------------------------------------------------------------------
# Grids: cases in priority order (the GPU script may be cut short: the headline figures come first).
# ----------------------------------------------------------------------------------------------------
def installed_alternatives(device: str) -> list[str]:
    """The peers available here: the log-prob functions (pure torch) everywhere, the GPU kernels on CUDA."""
    names = list(peers.logprob_providers())
    if not str(device).startswith("cuda"):
        return names
    return names + [name for package, name in ALTERNATIVES if importlib.util.find_spec(package) is not None]


def _provider_variants(op: str, provider: str, mode: str) -> list[tuple[str, str | None]]:
    """apa_fast's losses run in both designs (two kernels, training mode), and in place where a backward runs.

    The per-token log-probs (reduction "none") have no training-mode design.
    """
    if op == "apa_loss" and provider == "apa_fast":
        inplace = [("apa_fast", "inplace")] if mode != "forward" else []
        return [("apa_fast", None), ("apa_fast", "fused_grad"), *inplace]
    return [(provider, None)]


def _cases(op, providers, modes, tokens, vocabs, dtypes):
    for dtype in dtypes:
        for vocab in vocabs:
            for n in tokens:
                for mode in modes:
                    for provider in providers:
                        for name, variant in _provider_variants(op, provider, mode):
                            yield Case(op, name, mode, n, vocab, dtype, variant)


def grid_cases(grid: str, device: str) -> list[Case]:
    """The cases of ``grid`` ("small": CPU-sized, seconds; "full": the GPU grid, a few minutes on an H100)."""
    compiled = ["eager_compiled", "apa_fast_compiled"]
    every = ["apa_fast", "eager", *compiled, *installed_alternatives(device)]
    if grid == "small":
        shape = CPU_SHAPE
        groups = [
            _cases("apa_loss", every, MODES, [shape["tokens"]], [shape["vocab"]], [shape["dtype"]]),
            _cases("apa_loss", ["apa_fast", "eager"], ["full"], CPU_TOKENS, [shape["vocab"]], [shape["dtype"]]),
            _cases("apa_loss", ["apa_fast", "eager", "eager_compiled"], ["full"], *CPU_LARGE),
            _cases("logprobs", ["apa_fast", "eager", *installed_alternatives(device)], ["full"], [shape["tokens"]],
                   [shape["vocab"]], [shape["dtype"]]),
        ]
    else:
        head_t, head_v, head_d = HEADLINE["tokens"], HEADLINE["vocab"], HEADLINE["dtype"]
        groups = [
            # The two designs (and in place) at the headline shape first: the first GPU run decides between them.
            _cases("apa_loss", ["apa_fast"], ["full"], [head_t], [head_v], [head_d]),
            _cases("apa_loss", every, MODES, [head_t], [head_v], [head_d]),
            _cases("apa_loss", every, MODES, GPU_TOKENS, [head_v], [head_d]),
            _cases("apa_loss", every, ["full"], [head_t], VOCAB_SWEEP, [head_d]),
            _cases("apa_loss", every, ["full"], [head_t], GPU_VOCABS, [head_d]),
            _cases("apa_loss", every, ["full"], [head_t], [head_v], ["float32"]),
            _cases("logprobs", ["apa_fast", "eager", *compiled], MODES, [head_t], [head_v], [head_d]),
            # The rest of the grid for the fused op and the eager baseline; torch.compile would add a
            # compilation per shape (about 10 s each) for figures the sweeps above already show.
            _cases("apa_loss", ["apa_fast", "eager"], ["full"], GPU_TOKENS, GPU_VOCABS, GPU_DTYPES),
            _cases("logprobs", ["apa_fast", "eager"], ["full"], GPU_TOKENS, [head_v], [head_d]),
        ]
    return list(dict.fromkeys(case for group in groups for case in group))  # dedupe, keep the order


def memory_target_cases() -> list[Case]:
    """The CPU memory target: forward+backward at 2,048 x 50,400 of the torch backend against plain eager."""
    shape = CPU_MEMORY_TARGET
    return list(_cases("apa_loss", ["apa_fast", "eager"], ["full"], [shape["tokens"]], [shape["vocab"]],
                       [shape["dtype"]]))


def logits_bytes(case: Case) -> int:
    """L: the logits' bytes."""
    return case.tokens * case.vocab * DTYPES[case.dtype].itemsize


def floor_bytes(case: Case) -> int:
    return FLOOR_PASSES[case.mode] * logits_bytes(case)


def bytes_by_design(case: Case) -> int:
    """The DRAM bytes the provider's design moves for the case's mode (benchmarks/README.md, "Bytes")."""
    passes = DESIGN_PASSES.get((case.provider, case.variant))
    if passes is not None:
        return passes[case.mode] * logits_bytes(case)
    if case.provider == "eager_compiled":
        # From Inductor's generated code for the reference (read, not run on a GPU; assumed for the plain eager
        # code, the same log_softmax + gather): the forward loops three times over each row; the backward of
        # `gather` writes a float32 [tokens x vocab] zeros buffer, scatters into it, and a fused kernel re-reads
        # it with the logits and writes the gradient.
        float32_nv = case.tokens * case.vocab * 4
        forward, backward = 3 * logits_bytes(case), 2 * float32_nv + 2 * logits_bytes(case)
        return {"forward": forward, "backward": backward, "full": forward + backward}[case.mode]
    return _eager_bytes(case.provider, case.op, case.mode, case.tokens, case.vocab, case.dtype)


class _ByteCounter(TorchDispatchMode):
    """Sums the bytes each aten op reads and writes (no reuse between ops): eager PyTorch's DRAM traffic."""

    WRITE_ONLY = {"aten.copy_.default", "aten.fill_.Scalar", "aten.zero_.default"}
    NO_TRAFFIC = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default"}
    GATHERS = {"aten.gather.default"}  # reads only the gathered elements (and the index)

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in self.NO_TRAFFIC or any(r.alias_info is not None and not r.alias_info.is_write
                                          for r in func._schema.returns):
            return out  # views move nothing
        written = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        read = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name in self.WRITE_ONLY:
            read = read[1:]
        elif name in self.GATHERS:
            read = read[1:] + written
        self.total += sum(t.numel() * t.element_size() for t in read + written)
        return out


@functools.cache
def _eager_bytes(provider: str, op: str, mode: str, tokens: int, vocab: int, dtype: str) -> int:
    """An eager provider's aten-op traffic for one case, counted on meta tensors (nothing allocated)."""
    case = Case(op, provider, mode, tokens, vocab, dtype)
    step, setup = build_measurement(case, make_inputs(case, "meta"))
    args = setup() if mode == "backward" else ()
    with _ByteCounter() as counter:
        step(*args)
    return counter.total


# ----------------------------------------------------------------------------------------------------
# Providers: each maps the inputs to the op's output (a scalar loss, or per-token log-probs).
# ----------------------------------------------------------------------------------------------------
def _apa_epilogue(logp, inputs):
    """The APA loss on given log-probs, in PyTorch: what a caller of a cross-entropy kernel writes."""
    residual = logp - inputs["ref_logprobs"] - inputs["advantages"] / LAM
    return residual.square().mean()


def _flash_attn_logprobs(logits, labels, inplace):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    losses, _ = cross_entropy_loss(logits, labels, inplace_backward=inplace)
    return -losses


def _liger_logprobs(logits, labels, inplace):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return -liger_cross_entropy(logits, labels, reduction="none")


_ALTERNATIVE_LOGPROBS = {"flash_attn": _flash_attn_logprobs, "liger": _liger_logprobs}


def _peer_logprobs(name: str):
    """A trainer's log-prob function on ``(8, N / 8, V)`` logits (their per-first-dimension loops see 8
    sequences, as in a micro-batch), flattened back to ``(N,)``."""
    fn = peers.logprob_providers()[name]

    def logprobs_of(logits, labels, inplace):
        batch = 8 if logits.shape[0] % 8 == 0 else 1
        return fn(logits.view(batch, -1, logits.shape[-1]), labels.view(batch, -1)).reshape(-1)

    return logprobs_of


@functools.cache
def _compiled_apa_fast(op: str):
    """The whole loss step with apa_fast inside, compiled with fullgraph=True (no graph break allowed)."""
    baselines.compiled(op)  # the same dynamo limits
    fused = apa_fast.loss if op == "apa_loss" else apa_fast.logprobs
    return torch.compile(fused, dynamic=False, fullgraph=True)


def op_function(case: Case):
    """``inputs -> output`` for the case's op and provider."""
    inplace = case.variant == "inplace"
    if case.provider == "apa_fast":
        design = FUSED_GRAD[case.variant]
        if case.op == "apa_loss":
            return lambda x: _with_design(design, lambda: apa_fast.loss(
                x["logits"], x["labels"], x["ref_logprobs"], x["advantages"], lam=LAM, inplace_backward=inplace))
        return lambda x: _with_design(design, lambda: apa_fast.logprobs(x["logits"], x["labels"]))
    if case.provider == "apa_fast_compiled":
        fn = _compiled_apa_fast(case.op)
        if case.op == "apa_loss":
            return lambda x: _with_design("0", lambda: fn(x["logits"], x["labels"], x["ref_logprobs"],
                                                          x["advantages"], lam=LAM))
        return lambda x: _with_design("0", lambda: fn(x["logits"], x["labels"]))
    if case.provider in ("eager", "eager_compiled"):
        fn = getattr(baselines, case.op) if case.provider == "eager" else baselines.compiled(case.op)
        if case.op == "apa_loss":
            return lambda x: fn(x["logits"], x["labels"], x["ref_logprobs"], x["advantages"], lam=LAM)
        return lambda x: fn(x["logits"], x["labels"])
    logprobs_of = _ALTERNATIVE_LOGPROBS.get(case.provider) or _peer_logprobs(case.provider)
    if case.op == "apa_loss":
        return lambda x: _apa_epilogue(logprobs_of(x["logits"], x["labels"], inplace), x)
    return lambda x: logprobs_of(x["logits"], x["labels"], inplace)


def _with_design(fused_grad: str, call):
    """Run ``call()`` with ``APA_FAST_FUSED_GRAD`` set (apa_fast reads it when the forward runs)."""
    with _environ("APA_FAST_FUSED_GRAD", fused_grad):
        return call()


@contextlib.contextmanager
def _environ(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def backend_of(case: Case, device: str) -> str | None:
    """The apa_fast backend that "auto" resolves to on ``device`` (None for other providers)."""
    if not case.provider.startswith("apa_fast"):
        return None
    return apa_fast._dispatch.pick_loss_backend("auto", torch.device(device))


def unavailable_reason(case: Case, device: str) -> str | None:
    """Why the case cannot be measured meaningfully here, or None."""
    ours = case.provider.startswith("apa_fast")
    if ours and str(device).startswith("cuda") and apa_fast._dispatch.interpreter_enabled():
        return "TRITON_INTERPRET is set: the kernels would run in the interpreter (run benchmarks on their own)"
    if ours or case.provider in _ALTERNATIVE_LOGPROBS or case.provider in peers.LOGPROBS:
        return _gradient_mismatch(case.provider, case.variant, device)
    return None


@functools.cache
def _gradient_mismatch(provider: str, variant: str | None, device: str) -> str | None:
    """Run the provider once at a small size against the reference: a benchmark of a wrong gradient is void."""
    case = Case("apa_loss", provider, "full", 256, 4096, "float32", variant)
    inputs = make_inputs(case, device)
    expected_loss = reference.apa_loss(inputs["logits"], inputs["labels"], inputs["ref_logprobs"],
                                       inputs["advantages"], lam=LAM)
    (expected_grad,) = torch.autograd.grad(expected_loss, inputs["logits"])
    try:
        loss = op_function(case)(inputs)
        (grad,) = torch.autograd.grad(loss, inputs["logits"])
    except Exception as exc:  # e.g. an API change in a third-party package
        if provider.startswith("apa_fast"):
            raise
        return f"{provider} failed on a small case ({type(exc).__name__}: {exc})"
    error = ((grad - expected_grad).norm() / expected_grad.norm()).item()
    if not error < 1e-3:
        if provider.startswith("apa_fast"):  # our own op wrong is a failure, not a skip
            raise AssertionError(f"{provider}'s gradient differs from the reference (relative error {error:.2e})")
        return f"{provider}'s gradient differs from the reference (relative error {error:.2e})"
    return None


# ----------------------------------------------------------------------------------------------------
# Inputs and timed steps.
# ----------------------------------------------------------------------------------------------------
def make_inputs(case: Case, device: str) -> dict:
    """Random inputs (never zeros): logits ~ N(0, 2^2) requiring grad, labels, plausible per-token floats."""
    n, v = case.tokens, case.vocab
    # A non-leaf, as a model's logits (inplace_backward never overwrites a leaf): the add saves no tensor, and the
    # timed gradient stops at the logits.
    anchor = torch.zeros((), dtype=DTYPES[case.dtype], device=device, requires_grad=True)
    logits = torch.randn(n, v, dtype=DTYPES[case.dtype], device=device) * 2 + anchor
    inputs = {
        "logits": logits,
        "labels": torch.randint(0, v, (n,), device=device),
        "ref_logprobs": -9.0 - 4.0 * torch.rand(n, device=device),
        "advantages": torch.randn(n, device=device),
        "upstream": torch.randn(n, device=device),  # d(downstream)/d(logprobs) for the logprobs op
    }
    if case.mutates_logits:
        inputs["pristine"] = logits.detach().clone()
    return inputs


def build_measurement(case: Case, inputs: dict):
    """``(step, setup)`` for `benchmarks.harness.measure`: the timed work of the mode and its untimed setup."""
    output_of = op_function(case)
    logits = inputs["logits"]

    def restore():
        # Providers that overwrite the logits get them back before every round: never time on gradients.
        if case.mutates_logits:
            with torch.no_grad():
                logits.copy_(inputs["pristine"])

    def gradient(output):
        upstream = None if output.dim() == 0 else inputs["upstream"]
        return torch.autograd.grad(output, logits, grad_outputs=upstream)

    def forward_setup():
        restore()
        return (output_of(inputs),)

    def plain_setup():
        restore()
        return ()

    if case.mode == "forward":
        return (lambda: output_of(inputs)), plain_setup
    if case.mode == "backward":
        return gradient, forward_setup
    return (lambda: gradient(output_of(inputs))), plain_setup

"""The log-prob ops' benchmark cases: who computes them (providers), on what inputs, and the timed steps.

Ops: ``apa_loss`` (`apa_fast.loss`, APA with lam 0.1 as its authors ran it) and ``logprobs``
(`apa_fast.logprobs`). Providers, by the names the records carry:

* ``apa_fast``: the fused op (Triton on CUDA; the chunked torch backend on a CPU, noted as ``backend``);
  variant ``inplace`` passes ``inplace_backward=True``;
* ``torch``: `apa_fast.reference`, the unfused eager code a trainer runs today;
* ``torch_compile``: ``torch.compile`` of that same reference (static shapes);
* ``flash_attn`` / ``liger``: their fused cross-entropy kernels for the log-probs, with the APA epilogue in
  PyTorch; only where the package imports, on CUDA, and only if its gradient matches the reference.

Before its first case, each fused provider's gradient is checked against the reference at a small size
(a mismatch fails for apa_fast and skips an alternative, whose API may have changed).

Modes: ``forward`` (the loss, with the autograd graph built as in training), ``backward`` (the gradient
from a forward done untimed), ``full`` (both). The memory floor counts the logits read once forward, read
once and the gradient written once backward.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass

import torch

import apa_fast
from apa_fast import reference

OPS = ("apa_loss", "logprobs")
MODES = ("forward", "backward", "full")
LAM = 0.1  # 1/lam = 10, the APA authors' setting
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Passes over the logits that the memory floor counts per mode: reads forward; read + write backward.
FLOOR_PASSES = {"forward": 1, "backward": 2, "full": 3}
# (package to import, provider name): the public fused cross-entropy kernels, GPU only.
ALTERNATIVES = (("liger_kernel", "liger"), ("flash_attn", "flash_attn"))

GPU_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768)
GPU_VOCABS = (32000, 50400, 128256, 151936)  # Llama-2, GPT-J / Pythia, Llama-3, Qwen-2
GPU_DTYPES = ("bfloat16", "float32")
HEADLINE = {"tokens": 16384, "vocab": 50400, "dtype": "bfloat16"}  # the target shape
CPU_SHAPE = {"tokens": 1024, "vocab": 32000, "dtype": "float32"}
CPU_TOKENS = (512, 1024)
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
    if not str(device).startswith("cuda"):
        return []
    return [name for package, name in ALTERNATIVES if importlib.util.find_spec(package) is not None]


def _provider_variants(op: str, provider: str, mode: str) -> list[tuple[str, str | None]]:
    """apa_fast's losses run with and without the in-place backward where a backward runs."""
    if op == "apa_loss" and provider == "apa_fast" and mode != "forward":
        return [("apa_fast", None), ("apa_fast", "inplace")]
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
    compiled = ["torch_compile"]
    every = ["apa_fast", "torch", "torch_compile", *installed_alternatives(device)]
    if grid == "small":
        shape = CPU_SHAPE
        groups = [
            _cases("apa_loss", every, MODES, [shape["tokens"]], [shape["vocab"]], [shape["dtype"]]),
            _cases("apa_loss", ["apa_fast", "torch"], ["full"], CPU_TOKENS, [shape["vocab"]], [shape["dtype"]]),
            _cases("logprobs", ["apa_fast", "torch"], ["full"], [shape["tokens"]], [shape["vocab"]], [shape["dtype"]]),
        ]
    else:
        head_t, head_v, head_d = HEADLINE["tokens"], HEADLINE["vocab"], HEADLINE["dtype"]
        groups = [
            _cases("apa_loss", every, MODES, [head_t], [head_v], [head_d]),
            _cases("apa_loss", every, MODES, GPU_TOKENS, [head_v], [head_d]),
            _cases("apa_loss", every, ["full"], [head_t], GPU_VOCABS, [head_d]),
            _cases("apa_loss", every, ["full"], [head_t], [head_v], ["float32"]),
            _cases("logprobs", ["apa_fast", "torch", *compiled], MODES, [head_t], [head_v], [head_d]),
            # The rest of the grid for the fused op and the eager baseline; torch.compile would add a
            # compilation per shape (about 10 s each) for figures the sweeps above already show.
            _cases("apa_loss", ["apa_fast", "torch"], ["full"], GPU_TOKENS, GPU_VOCABS, GPU_DTYPES),
            _cases("logprobs", ["apa_fast", "torch"], ["full"], GPU_TOKENS, [head_v], [head_d]),
        ]
    return list(dict.fromkeys(case for group in groups for case in group))  # dedupe, keep the order


def memory_target_cases() -> list[Case]:
    """The CPU memory target: forward+backward at 2,048 x 50,400 of the torch backend against the reference."""
    shape = CPU_MEMORY_TARGET
    return list(_cases("apa_loss", ["apa_fast", "torch"], ["full"], [shape["tokens"]], [shape["vocab"]],
                       [shape["dtype"]]))


def floor_bytes(case: Case) -> int:
    return FLOOR_PASSES[case.mode] * case.tokens * case.vocab * DTYPES[case.dtype].itemsize


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


@functools.cache
def _compiled(op: str):
    # Static shapes: each benchmarked shape gets its own specialised graph, as in a fixed-length trainer.
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    eager = reference.apa_loss if op == "apa_loss" else reference.logprobs
    return torch.compile(eager, dynamic=False)


def op_function(case: Case):
    """``inputs -> output`` for the case's op and provider."""
    inplace = case.variant == "inplace"
    if case.provider == "apa_fast":
        if case.op == "apa_loss":
            return lambda x: apa_fast.loss(x["logits"], x["labels"], x["ref_logprobs"], x["advantages"], lam=LAM,
                                           inplace_backward=inplace)
        return lambda x: apa_fast.logprobs(x["logits"], x["labels"])
    if case.provider in ("torch", "torch_compile"):
        eager = case.provider == "torch"
        if case.op == "apa_loss":
            fn = reference.apa_loss if eager else _compiled("apa_loss")
            return lambda x: fn(x["logits"], x["labels"], x["ref_logprobs"], x["advantages"], lam=LAM)
        fn = reference.logprobs if eager else _compiled("logprobs")
        return lambda x: fn(x["logits"], x["labels"])
    logprobs_of = _ALTERNATIVE_LOGPROBS[case.provider]
    if case.op == "apa_loss":
        return lambda x: _apa_epilogue(logprobs_of(x["logits"], x["labels"], inplace), x)
    return lambda x: logprobs_of(x["logits"], x["labels"], inplace)


def backend_of(case: Case, device: str) -> str | None:
    """The apa_fast backend that "auto" resolves to on ``device`` (None for other providers)."""
    if case.provider != "apa_fast":
        return None
    return apa_fast._dispatch.pick_loss_backend("auto", torch.device(device))


def unavailable_reason(case: Case, device: str) -> str | None:
    """Why the case cannot be measured meaningfully here, or None."""
    if case.provider == "apa_fast" and str(device).startswith("cuda") and apa_fast._dispatch.interpreter_enabled():
        return "TRITON_INTERPRET is set: the kernels would run in the interpreter (run benchmarks on their own)"
    if case.provider == "apa_fast" or case.provider in _ALTERNATIVE_LOGPROBS:
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
        if provider == "apa_fast":
            raise
        return f"{provider} failed on a small case ({type(exc).__name__}: {exc})"
    error = ((grad - expected_grad).norm() / expected_grad.norm()).item()
    if not error < 1e-3:
        if provider == "apa_fast":  # our own op wrong is a failure, not a skip
            raise AssertionError(f"apa_fast's gradient differs from the reference (relative error {error:.2e})")
        return f"{provider}'s gradient differs from the reference (relative error {error:.2e})"
    return None


# ----------------------------------------------------------------------------------------------------
# Inputs and timed steps.
# ----------------------------------------------------------------------------------------------------
def make_inputs(case: Case, device: str) -> dict:
    """Random inputs (never zeros): logits ~ N(0, 2^2) requiring grad, labels, plausible per-token floats."""
    n, v = case.tokens, case.vocab
    logits = (torch.randn(n, v, dtype=DTYPES[case.dtype], device=device) * 2).requires_grad_()
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

"""torch.compile and torch.library contracts of every op: opcheck of each registered custom op, each public op
under ``torch.compile(fullgraph=True)`` equal to eager (values and gradients), and a compiled tiny GPT-J step.

On CPU the compiled graphs call the torch backend; the Triton-backed ops are opchecked under the interpreter.
"""

import pytest
import torch
from conftest import assert_close_rel
from oracles import IGNORE, make_inputs

import apa_fast
from apa_fast import _dispatch, linear, logprob

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not _dispatch.interpreter_enabled(),
                                                    reason="TRITON_INTERPRET=0: Triton cannot run CPU tensors")),
    "torch",
]


def _rows(shape=(2, 3), vocab=37):
    logits, labels, aux, adv, mask, _ = make_inputs(shape, vocab)
    labels32 = apa_fast.validation.token_labels(labels, mask, IGNORE, rows_shape=shape, vocab=vocab,
                                                device=logits.device, anchor="logits")
    return logits, labels32, aux.reshape(-1), adv.reshape(-1)


# ----------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration and AOT dispatch of every custom op.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_logits_ops(backend):
    logits, labels32, aux, adv = _rows()
    x = logits.clone().requires_grad_()
    torch.library.opcheck(logprob._forward_op, (x, labels32, aux, adv, 1, 0.8, 2.0, 0.0, backend, False))
    stats = logprob._forward_op(logits, labels32, aux, adv, 1, 0.8, 2.0, 0.0, backend, False)
    row_grad = torch.randn(labels32.shape)
    torch.library.opcheck(logprob._backward_op, (logits, labels32, stats[1], row_grad, 0.8, backend))
    torch.library.opcheck(logprob._backward_inplace_op, (logits.clone(), labels32, stats[1], row_grad, 0.8, backend))
    denom = torch.tensor(4.0)
    torch.library.opcheck(logprob._loss_and_grad_op, (x, labels32, aux, adv, denom, 1, 0.8, 2.0, 0.0, "mean", backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_logits_ops_with_entropy(backend):
    logits, labels32, aux, adv = _rows()
    x = logits.clone().requires_grad_()
    torch.library.opcheck(logprob._forward_op, (x, labels32, aux, adv, 2, 0.8, 0.2, 0.0, backend, False, True))
    stats = logprob._forward_op(logits, labels32, aux, adv, 2, 0.8, 0.2, 0.0, backend, False, True)
    assert stats.shape == (5, labels32.numel())
    row_grad, entropy_grad = torch.randn(labels32.shape), torch.randn(labels32.shape)
    entropy_args = (stats[1], row_grad, 0.8, backend, stats[4], entropy_grad)
    torch.library.opcheck(logprob._backward_op, (logits, labels32, *entropy_args))
    torch.library.opcheck(logprob._backward_inplace_op, (logits.clone(), labels32, *entropy_args))
    for reduction in ("mean", "sum"):
        torch.library.opcheck(logprob._loss_and_grad_op, (x, labels32, aux, adv, torch.tensor(4.0), 1, 0.8, 2.0, 0.0,
                                                          reduction, backend, 0.05, True))


def test_opcheck_validation_and_linear_ops():
    _, labels, _, _, mask, _ = make_inputs((2, 3), 37)
    for mask_arg in (None, mask, mask.float()):
        torch.library.opcheck(apa_fast.validation._token_labels_op, (labels, mask_arg, 37, IGNORE))
    hidden, weight, bias = (torch.randn(2, 3, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True),
                            torch.randn(37, requires_grad=True))
    _, labels32, aux, adv = _rows()
    for reduction in ("mean", "none"):
        args = (hidden, weight, bias, labels32, aux, adv, torch.tensor(5.0) if reduction == "mean" else None, 1, 1.0,
                1.0, 0.0, 1.5, 4.0, reduction, 4, "torch", True, True, True)
        torch.library.opcheck(linear._linear_forward_op, args)
    lse, row_grad = torch.randn(6), torch.randn(6)
    torch.library.opcheck(linear._linear_backward_op, (hidden.detach(), weight.detach(), None, labels32, lse, row_grad,
                                                       1.0, 1.0, 0.0, 4, "torch", True, True, False))
    # With the entropy: the entropy output, and its gradient term in the backward.
    for reduction in ("sum", "none"):
        args = (hidden, weight, bias, labels32, aux, adv, None, 2, 1.0, 0.2, 0.0, 1.5, 4.0, reduction, 4, "torch", True,
                True, True, 0.05, True)
        torch.library.opcheck(linear._linear_forward_op, args)
    torch.library.opcheck(linear._linear_backward_op, (hidden.detach(), weight.detach(), None, labels32, lse, row_grad,
                                                       1.0, 1.0, 0.0, 4, "torch", True, True, False, torch.rand(6),
                                                       torch.randn(6)))
    # Its backward raises by design: everything but the AOT-dispatch backward.
    torch.library.opcheck(logprob._once_op, (torch.randn(3, 4), torch.zeros((), requires_grad=True)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------------------------------
# Every public op compiled with fullgraph=True equals eager.
# ----------------------------------------------------------------------------------------------------
def _logits_ops():
    yield "loss", lambda x, d: apa_fast.loss(x, d["labels"], d["aux"], d["adv"][:, 0], d["mask"].float(), lam=0.5,
                                             temperature=0.9, ignore_index=IGNORE)
    yield "ppo_loss", lambda x, d: apa_fast.ppo_loss(x, d["labels"], d["aux"], d["adv"], d["mask"], normalizer=7.0,
                                                     ignore_index=IGNORE)
    yield "awr_loss", lambda x, d: apa_fast.awr_loss(x, d["labels"], d["adv"], d["mask"], reduction="sum",
                                                     ignore_index=IGNORE)
    yield "logprobs", lambda x, d: (apa_fast.logprobs(x, d["labels"], ignore_index=IGNORE) * d["weights"]).sum()
    # Entropy: the bonus in the loss, the logged entropy beside it; log-probs and entropy both differentiated.
    yield "ppo_loss+entropy", lambda x, d: _plus_entropy(apa_fast.ppo_loss(
        x, d["labels"], d["aux"], d["adv"], d["mask"], ignore_index=IGNORE, entropy_coef=0.1, return_entropy=True))
    yield "logprobs+entropy", lambda x, d: _plus_entropy(apa_fast.logprobs(
        x, d["labels"], temperature=0.8, ignore_index=IGNORE, return_entropy=True), d["weights"])


def _plus_entropy(outputs, weights=None):
    """One scalar from (loss or logp, entropy): for the losses the entropy is detached (its sum only checks its
    value); for log-probs both are differentiated."""
    value, entropy = outputs
    value = value if weights is None else (value * weights).sum()
    return value + (entropy * torch.linspace(0.5, 1.5, entropy.numel()).view(entropy.shape)).sum()


@pytest.mark.parametrize("design", ["0", "1"], ids=["two-kernel", "training-mode"])
@pytest.mark.parametrize("name, op", list(_logits_ops()), ids=lambda v: v if isinstance(v, str) else "")
def test_logits_ops_compile_without_graph_breaks(name, op, design, monkeypatch):
    monkeypatch.setenv("APA_FAST_FUSED_GRAD", design)
    logits, labels, aux, adv, mask, weights = make_inputs((2, 5), 61)
    data = dict(labels=labels, aux=aux, adv=adv, mask=mask, weights=weights)
    results = []
    for fn in (op, torch.compile(op, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        value = fn(x, data)
        value.backward()
        results.append((value.detach(), x.grad))
    (want_value, want_grad), (got_value, got_grad) = results
    assert_close_rel(got_value, want_value, 1e-6, f"{name} value")
    assert_close_rel(got_grad, want_grad, 1e-6, f"{name} grad")


@pytest.mark.parametrize("kind", ["loss", "logprobs", "ppo_loss+entropy", "awr_loss+entropy", "logprobs+entropy"])
def test_linear_ops_compile_without_graph_breaks(kind):
    hidden, weight, bias = torch.randn(2, 5, 8), torch.randn(61, 8) / 3, torch.randn(61)
    _, labels, aux, adv, mask, weights = make_inputs((2, 5), 61)

    def step(h, w):
        if kind == "loss":
            return apa_fast.linear_loss(h, w, labels, aux, adv, mask, bias=bias, logit_softcap=5.0, ignore_index=IGNORE)
        if kind == "ppo_loss+entropy":
            return _plus_entropy(apa_fast.linear_ppo_loss(h, w, labels, aux, adv, mask, bias=bias, ignore_index=IGNORE,
                                                          entropy_coef=0.1, return_entropy=True))
        if kind == "awr_loss+entropy":  # per token: the gradient in the backward, through the entropy term too
            return _plus_entropy(apa_fast.linear_awr_loss(h, w, labels, adv, mask, bias=bias, ignore_index=IGNORE,
                                                          reduction="none", entropy_coef=0.1, return_entropy=True),
                                 weights)
        if kind == "logprobs+entropy":
            return _plus_entropy(apa_fast.linear_logprobs(h, w, labels, bias=bias, logit_scale=2.0,
                                                          ignore_index=IGNORE, return_entropy=True), weights)
        return (apa_fast.linear_logprobs(h, w, labels, bias=bias, ignore_index=IGNORE) * weights).sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = fn(h, w)
        value.backward()
        results.append((value.detach(), h.grad, w.grad))
    for what, got, want in zip(("value", "hidden grad", "weight grad"), results[1], results[0], strict=True):
        assert_close_rel(got, want, 1e-6, f"linear {kind} {what}")


def test_wrong_labels_raise_the_same_error_when_compiled():
    logits, labels, aux, adv, mask, _ = make_inputs((2, 3), 11)
    labels[0, 0], mask[0, 0] = 11, True
    compiled = torch.compile(lambda x: apa_fast.loss(x, labels, aux, adv, mask), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*found 11"):
        compiled(logits)


@pytest.mark.slow
def test_compiled_gptj_step_matches_eager():
    """A tiny GPT-J forward, the APA loss and the backward in one Inductor graph, equal to eager."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTJConfig(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=4, rotary_dim=8)
    model = transformers.GPTJForCausalLM(config).eval()
    input_ids = torch.randint(0, 101, (2, 12))
    ref, adv, mask = torch.randn(2, 11) - 4.0, torch.randn(2), torch.rand(2, 11) > 0.3

    def step(ids):
        logits = model(ids).logits
        return apa_fast.loss(logits[:, :-1], ids[:, 1:], ref, adv, mask, lam=0.5)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        value = fn(input_ids)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    assert_close_rel(results[1][0], results[0][0], 1e-5, "value")
    for got, want in zip(results[1][1], results[0][1], strict=True):
        assert_close_rel(got, want, 1e-4, "parameter gradient")

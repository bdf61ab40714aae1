"""The fused APA loss end to end on CPU: a tiny causal LM, one APA step, checked against the unfused path.

Run: python examples/fused_loss.py
"""

import torch

import apa_fast

torch.manual_seed(0)
batch, seq, hidden, vocab = 4, 33, 64, 50400  # GPT-J's vocabulary
embed = torch.nn.Embedding(vocab, hidden)
lm_head = torch.nn.Linear(hidden, vocab, bias=False)
input_ids = torch.randint(0, vocab, (batch, seq))
response_mask = torch.zeros(batch, seq - 1, dtype=torch.bool)
response_mask[:, 16:] = True  # the tokens after the prompt

logits = lm_head(embed(input_ids))  # (B, T, V)
labels = input_ids[:, 1:]  # position i scores token i + 1
with torch.no_grad():  # pi_init's log-probs and the advantages are data
    ref_logprobs = apa_fast.logprobs(logits[:, :-1], labels) + 0.01 * torch.randn(batch, seq - 1)
    advantages = torch.randn(batch, seq - 1)

# logits[:, :-1] is a strided view: the fused op reads it in place, no copy.
loss = apa_fast.loss(logits[:, :-1], labels, ref_logprobs, advantages, response_mask, lam=0.1)
loss.backward()
fused_grad = lm_head.weight.grad.clone()

lm_head.weight.grad = None
unfused = apa_fast.reference.apa_loss(lm_head(embed(input_ids))[:, :-1], labels, ref_logprobs, advantages,
                                      response_mask, lam=0.1)
unfused.backward()
grad_err = ((fused_grad - lm_head.weight.grad).norm() / lm_head.weight.grad.norm()).item()
print(f"APA loss fused {loss.item():.6f}  unfused {unfused.item():.6f}  lm_head grad rel. diff {grad_err:.2e}")
assert abs(loss.item() - unfused.item()) <= 1e-5 * abs(unfused.item()) and grad_err < 1e-5

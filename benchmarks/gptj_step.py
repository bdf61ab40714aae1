"""The trainer's policy update at GPT-J-6B's shape on one GPU: time per step, tokens/s and peak memory.

    python -m benchmarks.gptj_step [--steps 2] [--batch 8] [--prompt 512] [--response 512] [--tiny]

One step is what `apa_fast.train.update.train_on_rollout` does per minibatch with ``fused_lm_head: true``: the
policy trunk forward (random-init GPT-J-6B: 28 layers, width 4,096, V 50,400, bf16 weights, gradient
checkpointing), `apa_fast.linear_loss` over the response tokens from the final hidden states, the backward and an
AdamW step. The rollout (generation, pi_init, critic) is not timed: this measures the fused loss inside a real
model's step, not the trainer's schedule, and it needs no DeepSpeed (absent from the GPU image). The first step
warms up (kernels compile, the allocator fills) and is reported apart. ``--tiny`` runs a two-layer model on any
device: the CPU test of this script.
"""

from __future__ import annotations

import argparse
import time

import torch

import apa_fast
from benchmarks.records import append_record

GPTJ_6B = dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)
TINY = dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=16, vocab_size=1003, n_positions=64)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    """A random-init GPT-J of ``shape`` (weights initialised in ``dtype`` directly on ``device``)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPTJForCausalLM(GPTJConfig(**shape))
    finally:
        torch.set_default_dtype(previous)
    # transformers 5.23 renamed gradient checkpointing; the GPU image's 5.x may predate the new name.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    return model.train()


def make_batch(batch: int, prompt: int, response: int, vocab: int, device: str, generator: torch.Generator):
    """Token ids, the response labels and mask, pi_init log-probs and advantages, as a rollout would hold them."""
    ids = torch.randint(vocab, (batch, prompt + response), generator=generator).to(device)
    labels = ids[:, prompt:]
    lengths = torch.randint(response // 2, response + 1, (batch, 1), generator=generator)
    mask = (torch.arange(response)[None] < lengths).to(device)  # responses end at different lengths
    ref = (-torch.rand(batch, response, generator=generator) * 8 - 2).to(device)  # log pi_init of a random model
    adv = torch.randn(batch, response, generator=generator).to(device)
    return ids, labels, mask, ref, adv


def step(model, optimizer, ids, labels, mask, ref, adv, prompt: int) -> float:
    hidden = model.transformer(input_ids=ids).last_hidden_state
    lm_head = model.lm_head
    loss = apa_fast.linear_loss(hidden[:, prompt - 1:-1], lm_head.weight, labels, ref, adv, mask, bias=lm_head.bias,
                                lam=0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # a host sync: the step's work is done when this returns


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else GPTJ_6B
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_model(shape, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    batch = make_batch(args.batch, args.prompt, args.response, shape["vocab_size"], device, generator)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps + 1):  # the first step is the warm-up
        start = time.perf_counter()
        losses.append(step(model, optimizer, *batch, prompt=args.prompt))
        times.append(time.perf_counter() - start)
    tokens = int(batch[2].sum())
    steady_s = sum(times[1:]) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return append_record(device, op="gptj_step", provider="apa_fast.linear_loss", mode="train_step",
                         shape="tiny" if args.tiny else "gptj-6b", params=sum(p.numel() for p in model.parameters()),
                         batch=args.batch, prompt=args.prompt, response=args.response, response_tokens=tokens,
                         dtype=str(dtype).removeprefix("torch."), warmup_s=times[0], ms=steady_s * 1e3,
                         tokens_per_s=tokens / steady_s,
                         sequence_tokens_per_s=args.batch * (args.prompt + args.response) / steady_s,
                         peak_mem_mb=peak, memory_metric="cuda_max_allocated" if peak is not None else None,
                         losses=losses)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="a two-layer GPT-J (the CPU check of this script)")
    record = run(parser.parse_args(argv))
    print({k: record[k] for k in ("device", "shape", "params", "ms", "tokens_per_s", "peak_mem_mb", "losses")})


if __name__ == "__main__":
    main()

"""APA inside TRL on CPU: a GRPO setup where the only change is the trainer's class name.

A random-init Llama (2 layers, hidden 64) and a byte-level BPE tokenizer trained here on the prompts; the
reward asks for the letter "e". Needs the trl extra: pip install 'apa_fast[trl]'.

Run: python examples/trl_apa.py [--mode logits|linear] [--steps 16]   (under 30 s on 2 CPU cores)
     python examples/trl_apa.py --entropy-coef 0.01 [--adaptive-entropy]   (TRL's entropy bonus, on APA's loss)
     python examples/trl_apa.py --baseline        (TRL's own GRPOTrainer on the same setup, for the step time)
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: model and tokenizer are built here

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from apa_fast.integrations.trl import APAGRPOTrainer  # noqa: E402  (instead of trl.GRPOTrainer)
from apa_fast.train.models import train_tokenizer  # noqa: E402

PROMPTS = [f"Write a word about the number {i}:" for i in range(64)]


def reward_letter_e(completions, **_):
    """The share of the letter "e" among the characters of each completion."""
    return [text.count("e") / max(len(text), 1) for text in completions]


class CPUClock(TrainerCallback):
    """CPU time of this process per optimizer step: unlike wall time, barely moved by other jobs on the machine."""

    def __init__(self):
        self.step_seconds = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.process_time() - self._start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["logits", "linear"], default="logits")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--baseline", action="store_true", help="train with trl.GRPOTrainer (its default loss)")
    parser.add_argument("--entropy-coef", type=float, default=0.0, help="TRL's entropy bonus coefficient")
    parser.add_argument("--adaptive-entropy", action="store_true", help="TRL's adaptive entropy coefficient")
    args = parser.parse_args()

    tokenizer = train_tokenizer(PROMPTS + ["the eel sees three geese" * 4], 320)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))

    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=8, num_generations=8,
                            gradient_accumulation_steps=2, max_completion_length=16, temperature=0.7,
                            learning_rate=1e-2, max_steps=args.steps, logging_steps=1, use_cpu=True,
                            report_to="none", save_strategy="no", seed=0, disable_dropout=True,
                            disable_tqdm=True, entropy_coef=args.entropy_coef,
                            use_adaptive_entropy=args.adaptive_entropy)
        common = dict(model=model, reward_funcs=reward_letter_e, args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS}))
        if args.baseline:
            trainer = GRPOTrainer(**common)
        else:
            trainer = APAGRPOTrainer(**common, apa_lam=1.0, apa_mode=args.mode)
        trainer.remove_callback(PrinterCallback)  # the table below replaces TRL's per-step log lines
        clock = CPUClock()
        trainer.add_callback(clock)
        trainer.train()

    logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    print(f"{'step':>4} {'loss':>8} {'reward':>7} {'logp-ref':>9} {'residual':>9} {'entropy':>9} {'wall ms':>8} "
          f"{'cpu ms':>8}")
    for entry, cpu_seconds in zip(logs, clock.step_seconds, strict=True):
        apa = "".join(f" {entry[key]:>9.4f}" if key in entry else f" {'-':>9}"
                      for key in ("apa/logp_minus_ref", "apa/residual", "entropy"))
        print(f"{entry['step']:>4} {entry['loss']:>8.4f} {entry['reward']:>7.3f}{apa} "
              f"{1000 * entry['step_time']:>8.1f} {1000 * cpu_seconds:>8.1f}")
    window = max(1, len(logs) // 4)
    first, last = (sum(entry["reward"] for entry in part) / len(part) for part in (logs[:window], logs[-window:]))
    name = "TRL's GRPO loss" if args.baseline else f"APA inside TRL ({args.mode} mode)"
    steady = slice(2, None) if len(logs) > 2 else slice(None)  # steps 1-2 include one-time set-up
    print(f"{name}: {len(logs)} steps, mean reward of the first and last {window} steps {first:.3f} -> {last:.3f}; "
          f"median step {1000 * statistics.median(e['step_time'] for e in logs[steady]):.1f} ms wall, "
          f"{1000 * statistics.median(clock.step_seconds[steady]):.1f} ms CPU (from step 3)")

if __name__ == "__main__":
    main()

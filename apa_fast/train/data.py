"""Prompts: Anthropic HH dialogues or Dahoas/rm-static rows, loaded through `datasets`, served in a fixed order.

HH rows hold ``chosen`` / ``rejected`` dialogues of "\\n\\nHuman:" and "\\n\\nAssistant:" turns; the prompt is
the dialogue up to and including the last "\\n\\nAssistant:". rm-static rows hold the prompt itself in ``prompt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class DataError(ValueError):
    """A malformed dataset row; the message names the file (or dataset) and the 0-based row."""


def hh_prompt(dialogue: str) -> str:
    """The dialogue up to and including its last "\\n\\nAssistant:" (what the policy must continue)."""
    if not isinstance(dialogue, str):
        raise ValueError(f"expected a dialogue string, got {type(dialogue).__name__}")
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0 or HUMAN not in dialogue[:cut]:
        raise ValueError("no '\\n\\nHuman:' turn followed by an '\\n\\nAssistant:' turn")
    return dialogue[: cut + len(ASSISTANT)]


def row_prompt(row: dict) -> str:
    """The prompt of one row in either format: ``prompt`` (rm-static) or ``chosen`` (HH)."""
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    if row.get("chosen") is not None:
        return hh_prompt(row["chosen"])
    raise ValueError(f"needs a non-empty 'prompt' or an HH 'chosen' dialogue; has keys {sorted(row)}")


def load_prompts(source: str, split: str = "train") -> list[str]:
    """All prompts of ``source``: comma-separated local .json/.jsonl files, or a `datasets` hub name."""
    import datasets

    files = [part.strip() for part in source.split(",")]
    local = all(Path(f).suffix in (".json", ".jsonl") for f in files)
    prompts = []
    for name in files if local else [source]:
        try:
            if local:
                if not Path(name).is_file():
                    raise FileNotFoundError(f"no such file {name}")
                rows = datasets.load_dataset("json", data_files=name, split="train")
            else:
                rows = datasets.load_dataset(name, split=split)
        except Exception as exc:  # a parse or schema error inside datasets: say which file it was
            raise DataError(f"{name}: cannot be read as a dataset ({type(exc).__name__}: {exc})") from exc
        for index, row in enumerate(rows):
            try:
                prompts.append(row_prompt(row))
            except ValueError as exc:
                raise DataError(f"{name}: row {index}: {exc}") from exc
    if not prompts:
        raise DataError(f"{source}: no rows")
    return prompts


class PromptStream:
    """Tokenised prompts served in a seeded shuffled order, epoch after epoch; ``position`` counts prompts served.

    Every process holds the same stream and takes its own slice of each global batch, so that the union of
    the slices is what one process would take; the position is the data state a checkpoint saves.
    """

    def __init__(self, token_ids: list[list[int]], seed: int, position: int = 0):
        self.token_ids, self.seed, self.position = token_ids, seed, position
        self._epoch, self._order = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.token_ids))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.token_ids), generator=generator)
        return int(self._order[offset])

    def take(self, global_batch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This process's prompts (rows rank, rank + world_size, ...) of the next ``global_batch`` prompts."""
        start, self.position = self.position, self.position + global_batch
        return [self.token_ids[self._index(p)] for p in range(start + rank, start + global_batch, world_size)]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, L)`` with L the longest sequence, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, -len(seq):] = torch.tensor(seq)
            mask[row, -len(seq):] = 1
    return ids, mask


def tokenize_prompts(prompts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, keeping the last ``max_tokens`` (the end of a dialogue is what gets answered)."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [seq[-max_tokens:] for seq in ids if seq]

"""Trainer data: HH prompt extraction, the rm-static format, malformed rows, the prompt stream, padding."""

import json

import pytest

from apa_fast.train.config import BUNDLED_PROMPTS, load_config
from apa_fast.train.data import DataError, PromptStream, hh_prompt, left_pad, load_prompts, row_prompt


def test_hh_prompt_cuts_after_the_last_assistant_turn():
    dialogue = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    assert hh_prompt(dialogue) == "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"


@pytest.mark.parametrize("dialogue", ["no turns at all", "\n\nAssistant: only an answer", 42])
def test_hh_prompt_rejects_dialogues_without_human_then_assistant(dialogue):
    with pytest.raises(ValueError):
        hh_prompt(dialogue)


def test_rm_static_rows_keep_their_prompt():
    row = {"prompt": "\n\nHuman: Why?\n\nAssistant:", "response": " Because.", "chosen": " Because."}
    assert row_prompt(row) == "\n\nHuman: Why?\n\nAssistant:"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_malformed_row_error_names_file_and_row(tmp_path):
    good = {"chosen": "\n\nHuman: A?\n\nAssistant: B.", "rejected": "\n\nHuman: A?\n\nAssistant: C."}
    bad = {"chosen": "Assistant said nothing to anyone", "rejected": "x"}
    path = _write_jsonl(tmp_path / "hh.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=r"hh\.jsonl: row 2: "):
        load_prompts(path)


def test_unreadable_and_missing_files_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b"}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        load_prompts(str(broken))
    with pytest.raises(DataError, match="absent.jsonl"):
        load_prompts(str(tmp_path / "absent.jsonl"))


def test_bundled_prompts_load_and_mix_formats(tmp_path):
    prompts = load_prompts(BUNDLED_PROMPTS)
    assert len(prompts) >= 200 and all(p.endswith("\n\nAssistant:") for p in prompts)
    static = _write_jsonl(tmp_path / "static.jsonl", [{"prompt": "\n\nHuman: Q\n\nAssistant:", "response": "R"}])
    assert load_prompts(f"{BUNDLED_PROMPTS},{static}")[-1] == "\n\nHuman: Q\n\nAssistant:"


def test_stream_shards_are_the_single_process_batch_and_resume_from_position():
    ids = [[i] for i in range(10)]
    single = PromptStream(ids, seed=3)
    batches = [single.take(4) for _ in range(4)]  # crosses two epochs
    ranks = [PromptStream(ids, seed=3) for _ in range(2)]
    for batch in batches:
        shards = [stream.take(4, rank, 2) for rank, stream in enumerate(ranks)]
        assert sorted(shards[0] + shards[1]) == sorted(batch)
    resumed = PromptStream(ids, seed=3, position=8)
    assert resumed.take(4) == batches[2]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_config_overrides_are_typed_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\nalgo: ppo\n")
    cfg = load_config(str(path), ["max_steps=7", "stop=['Human:']", "lr=2"], seed=5)
    assert (cfg.lr, cfg.algo, cfg.max_steps, cfg.stop, cfg.seed) == (2.0, "ppo", 7, ["Human:"], 5)
    with pytest.raises(ValueError, match="unknown config field"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="max_steps"):
        load_config(None, ["max_steps=many"])
    with pytest.raises(ValueError, match="algo"):
        load_config(None, ["algo=dpo"])


def test_gptj_6b_config_is_complete_and_gives_a_consistent_deepspeed_config():
    from apa_fast.train.trainer import deepspeed_config

    cfg = load_config("configs/gptj-6b-hh.yaml")
    assert (cfg.apa_lam, cfg.lr, cfg.num_layers_unfrozen, cfg.max_new_tokens) == (0.1, 1e-6, 2, 128)
    ds = deepspeed_config(cfg, world_size=8, bf16=True)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 8 == cfg.minibatch_size
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # ZeRO-Offload steps with DeepSpeed's CPU Adam
    zero3 = deepspeed_config(load_config("configs/gptj-6b-hh.yaml", ["deepspeed_config=configs/ds_zero3.json"]), 8,
                             True)
    assert zero3["zero_optimization"]["stage"] == 3 and zero3["optimizer"]["params"]["torch_adam"]

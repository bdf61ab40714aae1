"""benchmarks/gptj_step.py (the GPU run's GPT-J-6B update step) runs end to end on a tiny GPT-J on the CPU."""

import json
import math

from benchmarks import gptj_step


def test_tiny_step_records_time_and_a_decreasing_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("APA_BENCH_RESULTS_DIR", str(tmp_path))
    gptj_step.main(["--tiny", "--device", "cpu", "--batch", "2", "--prompt", "6", "--response", "5", "--steps", "2"])
    (path,) = tmp_path.glob("*.jsonl")
    record = json.loads(path.read_text().splitlines()[-1])
    assert record["op"] == "gptj_step" and record["shape"] == "tiny" and record["params"] > 0
    assert 0 < record["response_tokens"] <= 2 * 5 and record["ms"] > 0 and record["tokens_per_s"] > 0
    losses = record["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert losses[-1] < losses[0], "three AdamW steps on one batch must lower its loss"

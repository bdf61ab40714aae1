"""The README's runnable example runs and checks itself."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fused_loss_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "fused_loss.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "APA loss fused" in result.stdout


def test_trl_apa_example_runs():
    """examples/trl_apa.py, shortened to 2 optimizer steps (the default 16 take up to 30 s on 2 cores)."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_apa.py"), "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "APA inside TRL (logits mode): 2 steps" in result.stdout

"""The thin APA trainer: DeepSpeed, a policy / pi_init / critic / reward, rollout, update, checkpoints.

Run ``apa-train`` or ``python -m apa_fast.train`` (see docs/trainer.md); in Python, ``train(TrainConfig(...))``.
"""

from .config import TrainConfig, load_config


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Run ``cfg`` (see `apa_fast.train.trainer.train`); DeepSpeed and transformers load on call."""
    from .trainer import train as run

    return run(cfg, resume=resume, overwrite=overwrite)


__all__ = ["TrainConfig", "load_config", "train"]

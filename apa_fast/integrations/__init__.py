"""APA inside other RLHF trainers. Each adapter is its own module, imported on demand:

- `apa_fast.integrations.trl`: `APAGRPOTrainer`, a drop-in for TRL's `GRPOTrainer` (``pip install apa_fast[trl]``).
- `apa_fast.integrations.openrlhf`: `APAPolicyLoss`, OpenRLHF's `PolicyLoss` call signature plus the reference
  log-probs, and the actor hook that passes them.
- `apa_fast.integrations.verl`: verl's policy losses never see the reference log-probs; the config recipe that
  gives APA's gradient from verl's own losses.

This package imports none of them (nor any trainer) at import time. See docs/integrations.md.
"""

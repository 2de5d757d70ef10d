"""The error a diverging training run ends with, raised by the model part and re-used by the engine.

It lives in the model part because the first place a divergence can be seen is the model's own loss
computation (NaN/Inf head outputs, before any library assertion trips over them) and the
checkpointer (NaN/Inf weights must never overwrite the last good checkpoint); the training loop adds
the iteration.
"""

from __future__ import annotations

DIVERGENCE_HINT = (
    "lower SOLVER.BASE_LR, or enable SOLVER.CLIP_GRADIENTS (SOLVER.CLIP_GRADIENTS.ENABLED True), "
    "or check the data (dataset/check.py)"
)


class NonFiniteLossError(FloatingPointError):
    """Training values became NaN or Inf (head outputs, losses, weights); the message says which."""

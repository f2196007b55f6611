"""How close an export's logits must be to the training model's: the export check's tolerance per stored dtype."""

from __future__ import annotations

# Largest accepted error of exported vs training-model logits, relative to the largest reference logit.
# Reduced precision rounds every layer's output, so the tolerance grows with the mantissa it drops.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}

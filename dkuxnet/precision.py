"""The two precision helpers that model and losses share: fp32 islands under bf16 autocast.

Inside an island autocast is off, so ops run in the dtype of their inputs; :func:`upcast` lifts bf16 / fp16
inputs to fp32 and leaves fp32 and fp64 alone (a float64 model or loss stays float64 for reference checks).
"""

from __future__ import annotations

import torch


def fp32_island(device: torch.device) -> torch.autocast:
    """Autocast disabled on ``device``: inside, ops run in the dtype of their inputs (upcast them with :func:`upcast`)."""
    return torch.autocast(device_type=device.type, enabled=False)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 → fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

"""Mixed precision by name: `fp32` (none), `bf16`, `fp16` autocast for the networks; callers keep their
own state (sampler, optimiser) in float32."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device_type` (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)

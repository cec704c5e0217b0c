"""Precision helpers: fp32 islands under bf16 autocast (model and losses), and TF32 off (:func:`true_fp32`).

Inside an island autocast is off, so ops run in the dtype of their inputs; :func:`upcast` lifts bf16 / fp16
inputs to fp32 and leaves fp32 and fp64 alone (a float64 model or loss stays float64 for reference checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def fp32_island(device: torch.device) -> torch.autocast:
    """Autocast disabled on ``device``: inside, ops run in the dtype of their inputs (upcast them with :func:`upcast`)."""
    return torch.autocast(device_type=device.type, enabled=False)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 → fp32; fp32 and fp64 unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _readable(get: Callable[[], object]) -> bool:
    """Whether torch answers a legacy TF32 getter: it raises once the newer settings disagree with the legacy ones."""
    try:
        get()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matrix products and cuDNN convolutions inside; every setting restored afterwards.

    Works whichever way TF32 was configured: with the legacy ``torch.backends.{cuda.matmul,cudnn}.allow_tf32``
    flags (or :func:`torch.set_float32_matmul_precision`), or with torch's newer ``fp32_precision`` settings
    (``torch.backends.fp32_precision``, ``torch.backends.cuda.matmul.fp32_precision``,
    ``torch.backends.cudnn.conv.fp32_precision`` …), after which torch raises a RuntimeError on reading a
    legacy flag that disagrees. A legacy flag that torch still reads is set to False (its setter keeps both
    kinds in step); then, where torch has them (2.9 and later), the matmul and convolution ``fp32_precision``
    are set to ``"ieee"``, which overrides an inherited ``"tf32"``. Settable without a GPU.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    settings = [s for s in (matmul, getattr(cudnn, "conv", None)) if s is not None and hasattr(s, "fp32_precision")]
    saved_new = [s.fp32_precision for s in settings]
    legacy = [m for m in (matmul, cudnn) if _readable(lambda m=m: m.allow_tf32)]
    saved_legacy = [m.allow_tf32 for m in legacy]
    saved_matmul = torch.get_float32_matmul_precision() if matmul in legacy else None
    try:
        for m in legacy:
            m.allow_tf32 = False
        for s in settings:
            s.fp32_precision = "ieee"
        yield
    finally:
        for m, value in zip(legacy, saved_legacy):
            m.allow_tf32 = value
        if saved_matmul is not None:
            torch.set_float32_matmul_precision(saved_matmul)
        for s, value in zip(settings, saved_new):
            s.fp32_precision = value

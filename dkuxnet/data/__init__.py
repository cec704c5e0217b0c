"""LA-layout data: reader and checker, splits, downloader, synthetic phantom, cache, augmentation.

``la``, ``download`` and ``phantom`` need only numpy / h5py / scipy and are imported eagerly; the
torch-based names (``VolumeBank``, ``quantize``, ``dequantize`` from ``cache``; ``sample_patches``,
``strong_view``, ``TwoStreamSampler`` from ``augment``) are imported on first access, so that the
data commands of the CLI start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from dkuxnet.data.download import DEFAULT_BASE_URL, download_la
from dkuxnet.data.la import (
    CASES_DIR,
    DatasetReport,
    Split,
    case_path,
    check_dataset,
    make_split,
    read_case,
    read_list,
)
from dkuxnet.data.phantom import make_phantom

_LAZY = {
    "VolumeBank": "dkuxnet.data.cache",
    "quantize": "dkuxnet.data.cache",
    "dequantize": "dkuxnet.data.cache",
    "sample_patches": "dkuxnet.data.augment",
    "strong_view": "dkuxnet.data.augment",
    "TwoStreamSampler": "dkuxnet.data.augment",
}

__all__ = [
    "CASES_DIR", "DEFAULT_BASE_URL", "DatasetReport", "Split", "case_path", "check_dataset",
    "download_la", "make_phantom", "make_split", "read_case", "read_list", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dkuxnet.data' has no attribute {name!r}")

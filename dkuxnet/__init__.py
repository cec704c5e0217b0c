"""dkuxnet: the reproducible companion to DKUXNet (ISBI 2024).

Semi-supervised left-atrium segmentation with a 3D UX-Net encoder, a convolutional decoder and
kMaX (k-means cross-attention) decoders, trained with query-distribution and segmentation
consistency. Modules: ``config`` (one config tree), ``data`` (LA reader, downloader, phantom,
cache, augmentation), ``models``, ``losses``, ``train``, ``inference``, ``metrics``, ``evaluate``,
``results``, ``viz``; the performance instruments in ``perf``.
"""

from dkuxnet.config import Config, get_preset

__version__ = "0.1.0"
__all__ = ["Config", "get_preset", "__version__"]

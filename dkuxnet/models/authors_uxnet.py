"""Parameters of the authors' ``UXNET`` class that our DKUXNet does not build.

``UXNET`` (``Rows21/DK-UXNet``, ``networks/UXNet_3D/network_backbone.py``) is the class the authors'
``main_train.py`` trains, and the ``official`` preset's architecture: 3 kMaX scales × 2 layers and the conv
head on dec0. Its UX blocks have no GRN (that layer is in the ``DKUNET`` copy of the encoder only) and
its ``ProjectionHead`` is never instantiated. It holds, besides what we build:

* a 32-way class head in each of its 6 kMaX layers, a class-embedding projection and the final 133-way
  class head (the same parts as ``DKUNET``, :func:`~dkuxnet.models.dkuxnet.authors_dead_parts`);
* a cluster-classification MLP hard-coded to 3 classes: ``Linear(64, N·3)`` where ours has ``N·K``.

None of them reaches the outputs the script trains on (the conv head's logits and the 3-group
assignment O); the MLP's extra class only fills a channel of the query-based output the script ignores.
"""

from __future__ import annotations

from dkuxnet.config import ModelConfig
from dkuxnet.models.dkuxnet import AUTHORS_FINAL_CLASSES, AUTHORS_LAYER_CLASSES

UXNET_MLP_CLASSES = 3  # ``MLP(num_queries * 256, 64, num_queries * 3)`` whatever the data set's K


def is_uxnet(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` has ``UXNET``'s architecture: the conv head (``seg_head="conv"``), 3 kMaX scales × 2 layers."""
    return (cfg.seg_head, cfg.kmax_scales, cfg.kmax_layers_per_scale) == ("conv", 3, 2)


def authors_uxnet_dead_parts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters ``UXNET`` holds for ``cfg`` beyond our DKUXNet built from ``cfg``, by part.

    With c = ``query_dim``, L = ``kmax_scales`` × ``kmax_layers_per_scale``, N = ``num_queries``,
    h = ``mlp_hidden``, K = ``num_classes``:
    class heads L·(c + 1)·32, class embedding c² + 2c (1×1 conv without bias + BatchNorm),
    final class head (c + 1)·133, MLP's fixed 3 classes (3 − K)·N·(h + 1) (negative for K > 3).
    Our count plus the sum is the authors' class: 65,500,197 for ``official`` (K = 2, N = 128).

    Raises:
        ValueError: ``cfg`` is not ``UXNET``'s architecture (:func:`is_uxnet`).
    """
    if not is_uxnet(cfg):
        raise ValueError(
            "cfg must be UXNET's architecture (seg_head='conv', kmax_scales=3, kmax_layers_per_scale=2), got "
            f"seg_head={cfg.seg_head!r}, kmax_scales={cfg.kmax_scales}, "
            f"kmax_layers_per_scale={cfg.kmax_layers_per_scale}"
        )
    c, layers = cfg.query_dim, cfg.kmax_scales * cfg.kmax_layers_per_scale
    return {
        "kmax_class_heads": layers * (c + 1) * AUTHORS_LAYER_CLASSES,
        "class_embedding": c * c + 2 * c,
        "final_class_head": (c + 1) * AUTHORS_FINAL_CLASSES,
        "mlp_3_classes": (UXNET_MLP_CLASSES - cfg.num_classes) * cfg.num_queries * (cfg.mlp_hidden + 1),
    }

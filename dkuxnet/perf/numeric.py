"""The training step's numbers on the device against float64 on the CPU, with the same kMaX assignments.

One train-mode forward + full loss + backward of the ``tiny`` model (:func:`~dkuxnet.perf.checks.check_config`,
BatchNorm on batch statistics) runs twice from the same weights and input: in float64 on the CPU, then in
fp32 on the device with TF32 off. The device run replays the float64 run's hard k-means assignments
(:func:`dkuxnet.models.blocks.replayed`), so a near-tie argmax cannot decide the comparison. Compared:
the loss, and the gradient of every parameter group (:func:`~dkuxnet.perf.checks.parameter_group`), as
relative errors ‖g − g₆₄‖ / ‖g₆₄‖. This covers the train-mode BatchNorm backward, the L2 normalisation and
the grouped log-sum-exp backward, and the replay itself.
"""

from __future__ import annotations

import torch

from dkuxnet.models.blocks import _replay_scope
from dkuxnet.perf.checks import (
    Tolerance, check_config, fixed_batch, fmt_groups, forward_loss, gradients, grouped_errors, relative_error,
    seeded_model, worst,
)
from dkuxnet.precision import true_fp32

# measured on a 2-core CPU with torch 2.13 (fp32 vs float64, tiny model): worst group 4e-6, loss 5e-8;
# on CUDA a first guess, to be replaced by a card's measurement
GRADIENT_TOLERANCE = {"cpu": Tolerance("gradient fp32 vs float64, worst group", 1e-4, ("cpu",)),
                      "cuda": Tolerance("gradient fp32 vs float64, worst group", 1e-3, ())}
LOSS_TOLERANCE = {"cpu": Tolerance("loss fp32 vs float64", 1e-5, ("cpu",)),
                  "cuda": Tolerance("loss fp32 vs float64", 1e-4, ())}


def train_step_vs_float64(device: torch.device) -> dict:
    """Loss and per-group gradient errors of the fp32 step on ``device`` against float64 on the CPU.

    Returns:
        ``loss_relative_error``, ``gradient_error_by_group``, ``worst_group``, ``replayed_assignments``,
        ``tolerance`` and ``warnings`` (a tolerance not yet measured on this device type).

    Raises:
        CheckFailed: an error above its tolerance on a device type where it has been measured.
    """
    cfg = check_config(device)
    model = seeded_model(cfg, torch.device("cpu")).double()
    x, y = fixed_batch(cfg, torch.device("cpu"), torch.float64)
    store: dict[int, list[torch.Tensor]] = {}
    with _replay_scope(False, store):  # records each kMaX layer's assignment
        loss64 = forward_loss(model, cfg, x, y)[0]
    loss64.backward()
    reference = gradients(model)
    model.zero_grad(set_to_none=True)
    model.float().to(device)
    replay = {key: [v.to(device) for v in values] for key, values in store.items()}
    with true_fp32():
        with _replay_scope(True, replay):  # the device run takes the float64 run's assignments
            loss32 = forward_loss(model, cfg, x.float().to(device), y.to(device))[0]
        loss32.backward()
    errors = grouped_errors(gradients(model), reference)
    name, err = worst(errors)
    loss_err = relative_error(loss32, loss64)
    kind = "cuda" if device.type == "cuda" else "cpu"
    warns = GRADIENT_TOLERANCE[kind].judge(err, device) + LOSS_TOLERANCE[kind].judge(loss_err, device)
    return {"loss_relative_error": loss_err, "gradient_error_by_group": errors, "worst_group": name,
            "largest": fmt_groups(errors), "replayed_assignments": sum(len(v) for v in store.values()),
            "tolerance": {"gradient": GRADIENT_TOLERANCE[kind].limit, "loss": LOSS_TOLERANCE[kind].limit},
            "warnings": warns}

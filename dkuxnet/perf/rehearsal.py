"""The checks of what a long run uses: activation checkpointing with the kMaX replay, bf16 autocast, the
optimiser, host syncs. Each runs the ``tiny`` model (:func:`~dkuxnet.perf.checks.check_config`) on the
device in a second or so, returns its numbers, and raises :class:`~dkuxnet.perf.checks.CheckFailed` when
a result is wrong. On a CPU they are the rehearsal's; on a GPU they check the card (bf16 on CUDA autocast).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dkuxnet import engine
from dkuxnet.perf.checks import (
    CheckFailed, Tolerance, check_config, fixed_batch, forward_loss, gradients, grouped_errors,
    relative_error, restored, seeded_model, worst,
)
from dkuxnet.perf.hostsync import conversions_in_step, cuda_syncs_in_step

# measured on a 2-core CPU with torch 2.13: checkpointed vs plain gradients 0 (bit-equal), bf16 vs fp32 loss
# 6e-5 (depthwise auto, i.e. the FFT function), the optimiser's update vs torch's single-tensor reference 0 to 1e-7
CHECKPOINT_TOLERANCE = Tolerance("gradient checkpointed vs plain, worst group", 1e-5, ("cpu",))
BF16_LOSS_TOLERANCE = Tolerance("loss bf16 autocast vs fp32, relative", 5e-3, ("cpu",))
OPTIMIZER_TOLERANCE = Tolerance("optimiser update vs torch's reference, relative", 1e-5, ("cpu",))
HOST_SYNC_STEPS = 3
aten = torch.ops.aten
STATISTICS = {aten.var_mean.correction, aten.var.correction, aten.std.correction, aten.std_mean.correction}


class _Watch(TorchDispatchMode):
    """Counts the hard assignments (``argmax``) and keeps the k-means targets (``index_add`` index) per phase,
    also inside backward (a checkpoint's recomputation); records the dtypes that :data:`STATISTICS` reductions
    (the ``var_mean`` of a BatchNorm over all entries) receive."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.argmax = {"forward": 0, "backward": 0}
        self.targets: dict[str, list[torch.Tensor]] = {"forward": [], "backward": []}
        self.statistics_dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is aten.argmax.default:
            self.argmax[self.phase] += 1
        elif func is aten.index_add.default:
            self.targets[self.phase].append(args[2].clone())  # B·V query rows of the k-means update
        elif func in STATISTICS:
            self.statistics_dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def check_checkpoint_replay(device: torch.device) -> dict:
    """One forward + loss + backward with ``checkpoint_activations`` on, against the same step with it off.

    Checks: every parameter group's gradient within :data:`CHECKPOINT_TOLERANCE` of the plain step's and
    the BatchNorm running statistics equal; some kMaX layers were recomputed in backward, none of them
    computed its assignment again (no ``argmax`` in backward: the forward's was replayed), and the k-means
    update in backward used exactly an assignment the forward computed.
    """
    cfg = check_config(device)
    model = seeded_model(cfg, device)
    x, y = fixed_batch(cfg, device)
    with restored(model):
        forward_loss(model, cfg, x, y)[0].backward()
        plain, plain_buffers = gradients(model), {k: v.clone() for k, v in model.named_buffers()}
    model.checkpoint_activations = True
    with _Watch() as watch:
        loss = forward_loss(model, cfg, x, y)[0]
        watch.phase = "backward"
        loss.backward()
    errors = grouped_errors(gradients(model), plain)
    buffers = max(relative_error(v, plain_buffers[k]) for k, v in model.named_buffers() if v.is_floating_point())
    recomputed = watch.targets["backward"]
    if not recomputed:
        raise CheckFailed("no kMaX layer was recomputed in backward: checkpointing is off where the run expects it")
    if watch.argmax["backward"]:
        raise CheckFailed(f"{watch.argmax['backward']} assignment(s) computed again in backward: "
                          f"the replay was not used")
    forward = watch.targets["forward"]
    stray = sum(not any(t.shape == f.shape and torch.equal(t, f) for f in forward) for t in recomputed)
    if stray:
        raise CheckFailed(f"{stray} of {len(recomputed)} recomputed k-means updates used an assignment the forward "
                          f"did not compute")
    if buffers > 0:
        raise CheckFailed(f"BatchNorm running statistics differ from the plain step's by {buffers:.1e} (relative)")
    name, err = worst(errors)
    warns = CHECKPOINT_TOLERANCE.judge(err, device)
    return {"replayed_layers": len(recomputed), "assignments_in_forward": watch.argmax["forward"],
            "assignments_in_backward": 0, "gradient_error_by_group": errors, "worst_group": name,
            "tolerance": CHECKPOINT_TOLERANCE.limit, "warnings": warns}


def check_bf16(device: torch.device) -> dict:
    """The same step under bf16 autocast (CUDA's, or the CPU's) and in fp32.

    Checks: the model's outputs are fp32 (its fp32 islands end the bf16 region), the statistics reductions
    (``var_mean``, ``var``, ``std``) ran in fp32, the BatchNorm running statistics and the gradients stay
    fp32 and finite, and the loss is within :data:`BF16_LOSS_TOLERANCE` of the fp32 loss. The depthwise
    convolutions take the run's own path (``auto``: the FFT function on the CPU, ``native`` on CUDA).
    """
    cfg = check_config(device)
    model = seeded_model(cfg, device)
    x, y = fixed_batch(cfg, device)
    with restored(model):
        loss32 = forward_loss(model, cfg, x, y)[0].detach()
    with restored(model), _Watch() as watch:
        loss16, out = forward_loss(model, cfg, x, y, autocast=torch.bfloat16)
        loss16.backward()
        grads = gradients(model)
        buffers = {k: v.dtype for k, v in model.named_buffers() if v.is_floating_point()}
    fields = {k: v.dtype for k, v in vars(out).items() if isinstance(v, torch.Tensor)}
    problems = [f"output {k} is {d}" for k, d in fields.items() if d != torch.float32]
    problems += [f"statistics reduced in {d}" for d in watch.statistics_dtypes
                 if d not in (torch.float32, torch.float64)]
    problems += [f"buffer {k} is {d}" for k, d in buffers.items() if d != torch.float32]
    problems += [f"loss is {loss16.dtype}"] if loss16.dtype != torch.float32 else []
    problems += [f"gradient of {k} is not finite" for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    if problems:
        raise CheckFailed("under bf16 autocast: " + "; ".join(problems[:4]))
    err = relative_error(loss16, loss32)
    return {"loss_fp32": float(loss32), "loss_bf16": float(loss16.detach()), "relative_error": err,
            "tolerance": BF16_LOSS_TOLERANCE.limit, "autocast": f"{device.type} bf16",
            "warnings": BF16_LOSS_TOLERANCE.judge(err, device)}


def _reference_optimizer(params: list[torch.Tensor], cfg: object) -> torch.optim.Optimizer:
    """torch's single-tensor implementation of the run's optimiser (no foreach, no fused kernel)."""
    train = cfg.train  # type: ignore[attr-defined]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, foreach=False, fused=False)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                           foreach=False)


def check_optimizer(device: torch.device, steps: int = 2) -> dict:
    """``steps`` steps of the optimiser the run builds (:func:`dkuxnet.engine._make_optimizer`: fused AdamW
    on CUDA) against torch's single-tensor reference on copies of the same parameters and gradients.

    Checks: the summed update of every parameter within :data:`OPTIMIZER_TOLERANCE` of the reference's.
    """
    cfg = check_config(device)
    model = seeded_model(cfg, device)
    x, y = fixed_batch(cfg, device)
    forward_loss(model, cfg, x, y)[0].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    start = [p.detach().clone() for p in params]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.detach().clone()
    optimizer = engine._make_optimizer(model, cfg.train, device)
    reference = _reference_optimizer(copies, cfg)
    for _ in range(steps):
        optimizer.step()
        reference.step()
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)])
    expected = torch.cat([(c.detach() - s).flatten() for c, s in zip(copies, start)])
    if not float(expected.abs().max()) > 0:
        raise CheckFailed("the reference optimiser did not move the parameters: nothing to compare")
    err = relative_error(update, expected)
    OPTIMIZER_TOLERANCE.judge(err, device)
    kind = {k: optimizer.defaults.get(k) for k in ("fused", "foreach")}
    return {"optimizer": type(optimizer).__name__, **kind, "steps": steps, "relative_error": err,
            "tolerance": OPTIMIZER_TOLERANCE.limit, "warnings": []}


def check_host_sync(device: torch.device, steps: int = HOST_SYNC_STEPS) -> dict:
    """``steps`` training steps (:func:`dkuxnet.engine.train_step`) of the tiny preset with checkpointing,
    after a warm-up step: no host conversion of a device tensor (any device) and, on CUDA, no sync that
    ``torch.cuda.set_sync_debug_mode`` reports.
    """
    from dkuxnet.perf.bench import synthetic_bank

    cfg = check_config(device, **{"model.checkpoint_activations": True})
    run = engine.build_run(cfg, synthetic_bank(cfg.data.patch_size, 4, device), 2, device)
    engine.train_step(run)
    found = conversions_in_step(run, steps)
    cuda = cuda_syncs_in_step(run, steps) if device.type == "cuda" else []
    if found or cuda:
        raise CheckFailed(f"host syncs in the training step: {'; '.join((found + cuda)[:3])}")
    method = "host conversions of device tensors" + (" + CUDA sync debug mode" if device.type == "cuda" else "")
    return {"steps": steps, "host_conversions": found, "cuda_sync_messages": cuda, "method": method, "warnings": []}

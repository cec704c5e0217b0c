"""Checkpointed kMaX layers: the backward recompute follows the forward's hard assignment, not a new argmax."""

from __future__ import annotations

import torch

from dkuxnet.models import kmax
from dkuxnet.models.blocks import maybe_checkpoint, replayed
from dkuxnet.models.kmax import KMaXLayer


def _grads(layer: KMaXLayer, pixels: torch.Tensor, z: torch.Tensor, ckpt: bool) -> list[torch.Tensor]:
    layer.zero_grad()
    z_out, m = maybe_checkpoint(layer, pixels, z, enabled=ckpt)
    (z_out.square().sum() + m.sin().sum()).backward()
    return [p.grad.clone() for p in layer.parameters()]


def _perturbed_recompute(monkeypatch) -> list[int]:
    """hard_assignment is exact on its first call and returns another assignment (query n+1) after it."""
    calls = [0]
    exact = kmax.hard_assignment

    def flipping(logits: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        index = exact(logits)
        return index if calls[0] == 1 else (index + 1) % logits.shape[1]

    monkeypatch.setattr(kmax, "hard_assignment", flipping)
    return calls


def test_recompute_reuses_forward_assignment(monkeypatch):
    torch.manual_seed(0)
    layer = KMaXLayer(pixel_channels=6, query_dim=8, embed_dim=8, num_heads=2, ffn_dim=16).double()
    with torch.no_grad():  # non-zero residual branches, so every parameter receives gradient
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pixels = torch.randn(2, 6, 4, 4, 2, dtype=torch.float64)
    z = torch.randn(2, 8, 5, dtype=torch.float64)
    want = _grads(layer, pixels, z, ckpt=False)
    calls = _perturbed_recompute(monkeypatch)
    got = _grads(layer, pixels, z, ckpt=True)
    assert calls[0] == 1  # the recompute did not take an argmax of its own
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(kmax, "replayed", lambda owner, compute: compute())  # without the replay ...
    calls[0] = 0
    changed = _grads(layer, pixels, z, ckpt=True)
    assert calls[0] == 2 and any(not torch.allclose(a, b) for a, b in zip(changed, want))  # ... backward differs


def test_replayed_outside_checkpoint_computes():
    owner = torch.nn.Identity()
    assert replayed(owner, lambda: torch.tensor(3)).item() == 3

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


def _layer_and_inputs() -> tuple[KMaXLayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = KMaXLayer(pixel_channels=6, query_dim=8, embed_dim=8, num_heads=2, ffn_dim=16).double()
    return layer, torch.randn(2, 6, 4, 4, 2, dtype=torch.float64), torch.randn(2, 8, 5, dtype=torch.float64)


def test_second_backward_through_checkpoint_recomputes_and_replays_again():
    """retain_graph=True twice doubles the gradients; autograd.grad twice gives the same; statistics updated once."""
    layer, pixels, z = _layer_and_inputs()
    z_out, m = maybe_checkpoint(layer, pixels, z, enabled=True)
    loss = z_out.square().sum() + m.sin().sum()
    stats = [b.clone() for b in layer.buffers()]
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in layer.parameters()]
    loss.backward(retain_graph=True)
    for a, p in zip(once, layer.parameters()):
        torch.testing.assert_close(p.grad, 2 * a, rtol=1e-12, atol=0)
    g1 = torch.autograd.grad(loss, list(layer.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(layer.parameters()))
    for a, b, c in zip(g1, g2, once):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(stats, layer.buffers()):
        assert torch.equal(a, b)  # the three recomputes left the running statistics alone


def _argmax_calls_in_compiled_backward(step) -> int:
    """Compile ``step`` with AOTAutograd (inductor's decompositions and partitioner, no code generation)."""
    import functools
    from importlib import import_module

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    backward_graphs = []

    def keep(gm, inputs):
        backward_graphs.append(gm)
        return gm.forward

    backend = aot_autograd(
        fw_compiler=lambda gm, inputs: gm.forward, bw_compiler=keep,
        decompositions=lambda: import_module("torch._inductor.compile_fx").select_decomp_table(),
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
    )
    torch._dynamo.reset()
    torch.compile(step, backend=backend, fullgraph=True)().backward()
    (graph,) = backward_graphs
    return sum(n.op == "call_function" and n.target is torch.ops.aten.argmax.default for n in graph.graph.nodes)


class _Assign(torch.nn.Module):
    """The replay's pattern in a few ops: a normalised affinity, its hard assignment, the k-means sum."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv1d(4, 3, 1)
        self.norm = torch.nn.BatchNorm1d(3)

    def forward(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.norm(self.proj(values))  # B×N×V
        index = replayed(self, lambda: kmax.hard_assignment(m))  # B×V
        return kmax.kmeans_update(values, index, 3), m  # B×C×N


def test_compiled_backward_reuses_forward_assignment(monkeypatch):
    """Under torch.compile the checkpointed region's backward has no argmax; with a recompute-all policy it has one."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from dkuxnet.models import blocks

    torch.manual_seed(0)
    module, values = _Assign(), torch.randn(2, 4, 6, requires_grad=True)  # the k-means sum backward needs the index

    def step():
        r, m = maybe_checkpoint(module, values, enabled=True)
        return r.square().sum() + m.sin().sum()

    assert _argmax_calls_in_compiled_backward(step) == 0
    recompute_all = functools.partial(
        create_selective_checkpoint_contexts, lambda ctx, op, *a, **k: CheckpointPolicy.MUST_RECOMPUTE
    )
    monkeypatch.setattr(blocks, "_SAVE_ARGMAX", recompute_all)
    assert _argmax_calls_in_compiled_backward(step) == 1

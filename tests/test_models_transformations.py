"""FCT / FastFill / reverse transformations: shapes, side-info handling and training with a batch of one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raybackfill.compat.losses import fastfill_loss
from raybackfill.models.transformations import (
    FastFillTransformation,
    ForwardTransformation,
    ReverseTransformation,
    SingleSafeBatchNorm1d,
)


@pytest.fixture(autouse=True)
def _seed():
    # Same random inputs on every run (conftest.py already pins torch to one thread for the session).
    torch.manual_seed(0)


def test_forward_transformation_maps_old_and_side_info_to_new_space():
    h = ForwardTransformation(old_dim=6, new_dim=10, side_dim=3, hidden_dim=8, mixer_dim=16)
    out = h(torch.randn(4, 6), torch.randn(4, 3))
    assert out.shape == (4, 10)
    assert h.uses_side_info and h.dims == {"old": 6, "side": 3, "new": 10}


def test_forward_transformation_reference_sizes_build():
    h = ForwardTransformation(old_dim=128, new_dim=128, side_dim=128, hidden_dim=256, mixer_dim=2048)
    linear_shapes = [tuple(m.weight.shape) for m in h.modules() if isinstance(m, nn.Linear)]
    assert linear_shapes == [(256, 128), (256, 256), (256, 128), (256, 256), (2048, 512), (2048, 2048), (128, 2048)]


def test_side_info_is_required_exactly_when_the_transformation_was_built_with_it():
    with_side = ForwardTransformation(old_dim=4, new_dim=5, side_dim=2, hidden_dim=8, mixer_dim=8)
    without = ForwardTransformation(old_dim=4, new_dim=5, hidden_dim=8, mixer_dim=8)
    with pytest.raises(ValueError, match="pass it"):
        with_side(torch.randn(3, 4))
    with pytest.raises(ValueError, match="without side-information"):
        without(torch.randn(3, 4), torch.randn(3, 2))
    assert without.dims == {"old": 4, "side": 0, "new": 5}


def test_without_side_info_the_side_branch_reads_the_old_embedding():
    h = ForwardTransformation(old_dim=4, new_dim=5, hidden_dim=8, mixer_dim=8).eval()
    old = torch.randn(3, 4)
    expected = h.mixer(torch.cat([h.old_branch(old), h.side_branch(old)], dim=1))
    assert torch.equal(h(old), expected)


def test_single_safe_batchnorm_matches_batchnorm_for_batches_of_two_or_more():
    safe, plain = SingleSafeBatchNorm1d(3), nn.BatchNorm1d(3)
    x = torch.randn(5, 3)
    assert torch.allclose(safe.train()(x), plain.train()(x))
    assert torch.allclose(safe.running_mean, plain.running_mean)


def test_single_safe_batchnorm_uses_running_statistics_for_one_item_in_training():
    norm = SingleSafeBatchNorm1d(3)
    norm.train()(torch.randn(8, 3) * 2 + 1)  # non-trivial running statistics
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(1, 3)
    out = norm(x)
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None


def test_fastfill_returns_embedding_and_per_item_uncertainty():
    model = FastFillTransformation(old_dim=4, new_dim=6, side_dim=2, hidden_dim=8, mixer_dim=8)
    h, s = model(torch.randn(5, 4), torch.randn(5, 2))
    assert h.shape == (5, 6) and s.shape == (5,)
    assert torch.allclose(s, model.uncertainty(h).squeeze(1))
    assert model.uses_side_info and model.dims == {"old": 4, "side": 2, "new": 6}


def test_fastfill_trains_on_a_batch_of_one():
    model = FastFillTransformation(old_dim=4, new_dim=6, hidden_dim=8, mixer_dim=8).train()
    classifier = nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    h, s = model(torch.randn(1, 4))
    loss = fastfill_loss(h, s, torch.randn(1, 6), torch.tensor([2]), classifier.weight, classifier.bias)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert h.shape == (1, 6) and s.shape == (1,) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert classifier.weight.grad is None


def test_reverse_transformation_maps_new_to_old_and_trains_on_one_item():
    psi = ReverseTransformation(new_dim=6, old_dim=4, hidden_dim=8).train()
    out = psi(torch.randn(1, 6))
    assert out.shape == (1, 4) and psi.dims == {"new": 6, "old": 4}
    out.sum().backward()
    assert all(p.grad is not None for p in psi.parameters())
